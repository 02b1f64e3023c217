//! Every merge method by name, tensor-level ([`crate::methods`]) and adapter-level
//! ([`crate::adapter::merge`]) behind one lookup; and configs checked against it.
//!
//! Adding a method is one file and one line in [`REGISTRY`] (see [`crate::methods`]).

use std::path::Path;

use crate::adapter::merge::{AdapterMerge, LoraAvg, CAT, SVD};
use crate::config::{self, MergeConfig};
use crate::error::{Error, Result};
use crate::methods::{self, MergeMethod, ParamSpec};

/// A registered method.
#[derive(Clone, Copy)]
pub enum Method {
    /// Merges tensor by tensor into a model.
    Tensor(&'static dyn MergeMethod),
    /// Merges LoRA adapters into one adapter.
    Adapter(&'static dyn AdapterMerge),
}

/// Every method, by name.
pub static REGISTRY: &[Method] = &[
    Method::Tensor(&methods::Linear),
    Method::Tensor(&methods::TASK_ARITHMETIC),
    Method::Tensor(&methods::TIES),
    Method::Tensor(&methods::DARE_LINEAR),
    Method::Tensor(&methods::DARE_TIES),
    Method::Tensor(&methods::BREADCRUMBS),
    Method::Tensor(&methods::BREADCRUMBS_TIES),
    Method::Tensor(&methods::DELLA),
    Method::Tensor(&methods::DELLA_LINEAR),
    Method::Tensor(&methods::Slerp),
    Method::Tensor(&methods::ModelStock),
    Method::Tensor(&methods::GeometricMedian),
    Method::Tensor(&methods::RegMean),
    Method::Tensor(&methods::RegMeanPlus),
    Method::Tensor(&methods::Sce),
    Method::Tensor(&methods::Nuslerp),
    Method::Tensor(&methods::Multislerp),
    Method::Tensor(&methods::Karcher),
    Method::Tensor(&methods::Nearswap),
    Method::Tensor(&methods::ArceeFusion),
    Method::Tensor(&methods::RAM),
    Method::Tensor(&methods::RAMPLUS_TL),
    Method::Tensor(&methods::Passthrough),
    Method::Tensor(&methods::TSV),
    Method::Tensor(&methods::ISO_C),
    Method::Tensor(&methods::ISO_CTS),
    Method::Adapter(&LoraAvg),
    Method::Adapter(&CAT),
    Method::Adapter(&SVD),
];

impl Method {
    /// The name configs use.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Tensor(m) => m.name(),
            Method::Adapter(m) => m.name(),
        }
    }

    /// Global parameters.
    pub fn parameters(&self) -> &'static [ParamSpec] {
        match self {
            Method::Tensor(m) => m.parameters(),
            Method::Adapter(m) => m.parameters(),
        }
    }

    /// Per-model parameters.
    pub fn model_parameters(&self) -> &'static [ParamSpec] {
        match self {
            Method::Tensor(m) => m.model_parameters(),
            Method::Adapter(m) => m.model_parameters(),
        }
    }

    /// Whether the config must name a `base_model`, which the method then sees apart from the
    /// models (adapter-level methods never do).
    pub fn requires_base(&self) -> bool {
        matches!(self, Method::Tensor(m) if m.requires_base())
    }

    /// Whether the method is merged layer by layer over calibration rows (see
    /// [`MergeMethod::merges_layer_by_layer`]): `regmean_plus`.
    pub fn merges_layer_by_layer(&self) -> bool {
        matches!(self, Method::Tensor(m) if m.merges_layer_by_layer())
    }

    /// Whether an entry naming the base model is the base, not one of the models (see
    /// [`MergeMethod::separates_base`] and [`MergeMethod::base_is_input`]).
    pub fn separates_base(&self) -> bool {
        matches!(self, Method::Tensor(m) if m.separates_base() || m.base_is_input())
    }

    /// Whether a named base model counts as one of the inputs ([`MergeMethod::base_is_input`]).
    pub fn base_is_input(&self) -> bool {
        matches!(self, Method::Tensor(m) if m.base_is_input())
    }

    /// Fewest and most input models besides the base (`None`: no limit).
    pub fn model_count(&self) -> (usize, Option<usize>) {
        match self {
            Method::Tensor(m) => (m.min_models(), m.max_models()),
            Method::Adapter(_) => (1, None),
        }
    }
}

/// The method called `name`.
pub fn lookup(name: &str) -> Option<Method> {
    REGISTRY.iter().copied().find(|m| m.name() == name)
}

/// Every method name, in registry order.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(Method::name).collect()
}

/// The method called `name`, or an error located at `origin` that lists the known ones.
pub fn get(name: &str, origin: &str) -> Result<Method> {
    lookup(name).ok_or_else(|| {
        Error::config(
            origin,
            format!(
                "unknown merge method `{name}` (known: {})",
                names().join(", ")
            ),
        )
    })
}

/// Reading configs checked against the registry (the schema alone is [`crate::config`]'s).
impl MergeConfig {
    /// Read a merge config file: mergekit YAML for `.yml` / `.yaml` (see
    /// [`config::mergekit`]), our TOML otherwise.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg = config::read(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Read a mergekit YAML config file, whatever its extension.
    pub fn from_mergekit_file(path: &Path) -> Result<Self> {
        let cfg = config::mergekit::read(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Parse TOML text (one `[merge]` table); `origin` names the text in errors (a file path).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let cfg = config::toml::parse(text, origin)?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Checks that do not need the models: at least one model, a known method.
    pub fn validate(&self, origin: &str) -> Result<()> {
        self.check_schema(origin)?;
        get(&self.method, origin).map(|_| ())
    }
}
