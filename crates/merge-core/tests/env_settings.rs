//! Hub settings come from the environment like the Python tools'. One test in its own process,
//! since it changes environment variables.

use merge_core::source::HubSettings;

#[test]
fn environment_variables_follow_huggingface_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), "hf_from_file\n").unwrap();
    for v in [
        "HF_TOKEN",
        "HF_AUTH_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
    ] {
        std::env::remove_var(v);
    }
    std::env::set_var("HF_HOME", &home);
    let s = HubSettings::from_env();
    assert_eq!(s.token.as_deref(), Some("hf_from_file"));
    assert_eq!(s.cache_dir, home.join("hub"));
    assert_eq!(s.endpoint, "https://huggingface.co");
    assert!(!s.offline);

    std::env::set_var("HF_AUTH_TOKEN", "hf_auth");
    assert_eq!(HubSettings::from_env().token.as_deref(), Some("hf_auth"));
    std::env::set_var("HF_TOKEN", "hf_token");
    assert_eq!(HubSettings::from_env().token.as_deref(), Some("hf_token"));

    std::env::set_var("HUGGINGFACE_HUB_CACHE", tmp.path().join("legacy"));
    assert_eq!(HubSettings::from_env().cache_dir, tmp.path().join("legacy"));
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("new"));
    assert_eq!(HubSettings::from_env().cache_dir, tmp.path().join("new"));

    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:5/");
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let s = HubSettings::from_env();
    assert_eq!(s.endpoint, "http://127.0.0.1:5");
    assert!(s.offline);
}
