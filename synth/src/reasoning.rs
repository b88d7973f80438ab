//! Reasoning traces for the `<think>` block: field by field, where the value was found in the
//! text, how it was normalised, and which fields are absent and why.

use serde_json::Value;

use crate::render::Fact;
use crate::values::Semantic;

/// How much the `<think>` block says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningStyle {
    /// Field by field: where each value is in the text and how it was normalised (the
    /// paper's long traces).
    #[default]
    Full,
    /// One sentence: the kind of record and how many fields the text gives. For small
    /// models trained from scratch, whose budget is better spent on the JSON itself.
    Brief,
}

/// The trace in the given style.
pub fn reason(style: ReasoningStyle, title: &str, facts: &[Fact], distractors: &[String]) -> String {
    match style {
        ReasoningStyle::Full => trace(title, facts, distractors),
        ReasoningStyle::Brief => brief(title, facts),
    }
}

/// `The text is a training record; the schema asks for 7 field(s) and the text gives 6.`
pub fn brief(title: &str, facts: &[Fact]) -> String {
    let given = facts.iter().filter(|f| f.value.is_some()).count();
    format!("The text is {}; the schema asks for {} field(s) and the text gives {given}.", with_article(title), facts.len())
}

fn with_article(title: &str) -> String {
    let kind = title.to_lowercase();
    let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {kind}")
}

/// A step-by-step trace over every schema property of the record.
pub fn trace(title: &str, facts: &[Fact], distractors: &[String]) -> String {
    let mut out = format!(
        "The text is {} and the schema asks for {} field(s). I go through them in schema order.\n",
        with_article(title),
        facts.len()
    );
    let mut ctx: Vec<String> = Vec::new();
    for (i, f) in facts.iter().enumerate() {
        if f.context != ctx && !f.context.is_empty() {
            out.push_str(&format!("Within {}:\n", f.context.join(" / ")));
        }
        ctx = f.context.clone();
        out.push_str(&format!("{}. `{}`", i + 1, f.path));
        match (&f.value, &f.surface) {
            (Some(v), Some(s)) => {
                let json = compact(v);
                if f.semantic == Semantic::Id || f.semantic == Semantic::Email || f.semantic == Semantic::Uuid {
                    out.push_str(&format!(" ({}): the text gives \"{s}\" next to \"{}\"; it fits the expected format, so {json}.\n", f.semantic.describe(), f.label));
                } else {
                    match &f.note {
                        Some(note) => out.push_str(&format!(": written \"{s}\" (\"{}\") — {note} → {json}.\n", f.label)),
                        None => out.push_str(&format!(": \"{}\" says \"{s}\" → {json}.\n", f.label)),
                    }
                }
            }
            (Some(Value::Null), _) => out.push_str(": the text marks it as not recorded, and the field allows null → null.\n"),
            (Some(Value::Array(a)), _) if a.is_empty() => out.push_str(": no entries are listed → [].\n"),
            (Some(v), None) => out.push_str(&format!(": → {}.\n", compact(v))),
            (None, _) if f.required => out.push_str(": required, but nothing in the text gives it.\n"),
            (None, _) => out.push_str(": optional and not mentioned in the text, so it is omitted.\n"),
        }
    }
    for d in distractors {
        out.push_str(&format!("The sentence \"{d}\" belongs to no field and is ignored.\n"));
    }
    out.push_str("All fields are accounted for; the object follows the schema's property order.");
    out
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
