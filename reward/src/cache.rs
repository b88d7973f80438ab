//! Compiled validators, cached per schema: schemas repeat across a group and a batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// A compiled schema or the reason it could not be compiled (e.g. a remote `$ref`, which is
/// never fetched: the validator is built without network or file resolvers).
pub type Compiled = Arc<Result<jsonschema::Validator, String>>;

/// Thread-safe validator cache keyed by the schema's JSON text.
#[derive(Default)]
pub struct ValidatorCache {
    map: Mutex<HashMap<String, Compiled>>,
}

impl ValidatorCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The compiled validator for `schema`, compiling it on first use.
    pub fn get(&self, schema: &Value) -> Compiled {
        let key = serde_json::to_string(schema).unwrap_or_default();
        if let Ok(map) = self.map.lock() {
            if let Some(v) = map.get(&key) {
                return Arc::clone(v);
            }
        }
        let compiled: Compiled = Arc::new(jsonschema::validator_for(schema).map_err(|e| format!("schema does not compile: {e}")));
        if let Ok(mut map) = self.map.lock() {
            map.insert(key, Arc::clone(&compiled));
        }
        compiled
    }

    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Schema adherence of `instance`: 1 when valid, else the share of instance locations
/// without an error (partial credit), 0 when the schema does not compile.
pub fn adherence(compiled: &Compiled, instance: &Value) -> (f64, Option<String>) {
    match compiled.as_ref() {
        Err(e) => (0.0, Some(e.clone())),
        Ok(v) => {
            let mut locations = std::collections::HashSet::new();
            let mut first = None;
            for err in v.iter_errors(instance) {
                if first.is_none() {
                    first = Some(format!("at `{}`: {err}", err.instance_path()));
                }
                locations.insert(err.instance_path().to_string());
            }
            if locations.is_empty() {
                return (1.0, None);
            }
            let nodes = crate::score::count_nodes(instance).max(1);
            ((1.0 - locations.len() as f64 / nodes as f64).clamp(0.0, 1.0), first)
        }
    }
}
