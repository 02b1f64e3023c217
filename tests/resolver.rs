//! Resolvers for tests: hub settings spelled out (never read from the user's environment),
//! and an offline resolver that finds models in a directory and nowhere else.

use std::path::Path;

use merge_core::source::{HubSettings, Resolver};

use crate::hub::CLOSED_ENDPOINT;

/// Hub settings with these values and no progress bars.
pub fn settings(endpoint: &str, cache: &Path, token: Option<&str>, offline: bool) -> HubSettings {
    HubSettings {
        endpoint: endpoint.into(),
        token: token.map(str::to_string),
        cache_dir: cache.to_path_buf(),
        offline,
        progress: false,
    }
}

/// A resolver that takes relative model paths from `base_dir` and reaches no hub: offline,
/// the endpoint a closed port, no token, and a cache directory nothing ever writes to
/// (offline resolution only reads the cache, and this one does not exist).
pub fn offline(base_dir: &Path) -> Resolver {
    let cache = std::env::temp_dir().join("testkit-no-hub-cache");
    Resolver::new(settings(CLOSED_ENDPOINT, &cache, None, true)).with_base_dir(base_dir)
}
