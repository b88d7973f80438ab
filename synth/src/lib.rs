//! # thinkjson-synth
//!
//! Synthetic training data for schema-following extraction, from regulated manufacturing and
//! quality-assurance records: (unstructured text, JSON Schema, filled object, reasoning trace)
//! rows, procedurally generated with enough variety that a model cannot learn shortcuts —
//! plus import of external (text, schema, object) sets. No tensors.
//!
//! Key types: [`DocKind`] (11 GMP document kinds whose schemas come from `schemars`),
//! [`SynthConfig`], [`Generator`], [`Row`], [`Split`], [`Style`].
//!
//! How a row is made:
//! 1. a kind's schema (or a random one built from the domain's fields) is varied —
//!    key style, field subsets, required/optional, nullable, `$defs`/inlined, sections,
//!    envelopes, `additionalProperties` ([`schema_ops::vary`]);
//! 2. an object is generated from the schema and always validates ([`object::generate`]);
//! 3. the record is written in one of six styles with surface variation, shuffled order and
//!    distractors; each leaf's position is recorded ([`render`]);
//! 4. a reasoning trace explains each field ([`reasoning::trace`]).
//!
//! ```
//! use thinkjson_synth::{generate, SynthConfig};
//! let rows = generate(SynthConfig { rows: 3, seed: 7, ..Default::default() })?;
//! assert_eq!(rows.len(), 3);
//! let messages = thinkjson_synth::prompt::messages(&rows[0].text, &rows[0].schema);
//! assert_eq!(messages[0].role, "system");
//! # Ok::<(), thinkjson_synth::SynthError>(())
//! ```

pub mod dataset;
pub mod domain;
mod error;
pub mod import;
pub mod object;
pub mod prompt;
pub mod reasoning;
pub mod render;
pub mod schema_ops;
pub mod stats;
pub mod values;

pub use dataset::{generate, split_of, stable_hash, Generator, Row, Split, SynthConfig};
pub use domain::DocKind;
pub use reasoning::ReasoningStyle;
pub use error::SynthError;
pub use render::{Span, Style};
