//! Regenerates the machine-made part of `fixtures/schemas/`: every domain kind's schema
//! (normalised, `$defs`/`$ref` kept) and random record schemas of depth 1–6.
//! The `hand_*.json` files next to them are written by hand.
//!
//! `cargo run -p thinkjson-synth --example schema_set -- fixtures/schemas`

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use thinkjson_synth::schema_ops::{leaf_catalogue, normalize, random_schema};
use thinkjson_synth::DocKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "fixtures/schemas".into());
    let out = std::path::Path::new(&out);
    std::fs::create_dir_all(out)?;
    let write = |name: &str, schema: &Value| -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(schema).map_err(std::io::Error::other)?;
        std::fs::write(out.join(format!("{name}.json")), text + "\n")
    };
    for kind in DocKind::ALL {
        write(&format!("domain_{}", kind.name()), &normalize(Value::from(kind.base_schema())))?;
    }
    let catalogue = leaf_catalogue();
    let mut rng = ChaCha8Rng::seed_from_u64(2502_14905);
    for i in 0..24 {
        let depth = 1 + i % 6;
        write(&format!("random_{i:02}_depth{depth}"), &random_schema(&catalogue, depth, &mut rng))?;
    }
    Ok(())
}
