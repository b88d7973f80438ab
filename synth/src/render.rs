//! Text rendering: the same record written in several styles, with value surface variation,
//! shuffled field order and distractors. Records where each leaf value appears.

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::schema_ops::{key_words, resolve};
use crate::values::{self, infer, surface, Semantic};

/// Writing styles of the source document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    Narrative,
    Legacy,
    Email,
    Bullets,
    Table,
    Log,
}

impl Style {
    pub const ALL: [Style; 6] = [Style::Narrative, Style::Legacy, Style::Email, Style::Bullets, Style::Table, Style::Log];
    pub fn name(self) -> &'static str {
        match self {
            Style::Narrative => "narrative",
            Style::Legacy => "legacy",
            Style::Email => "email",
            Style::Bullets => "bullets",
            Style::Table => "table",
            Style::Log => "log",
        }
    }
}

/// Where a leaf value of the object appears in the text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// JSON pointer of the value in the object.
    pub pointer: String,
    /// The text as it appears in the document.
    pub surface: String,
    /// Byte offsets in the text.
    pub start: usize,
    pub end: usize,
}

/// One schema property of the record, present or not.
#[derive(Debug, Clone)]
pub struct Fact {
    pub pointer: String,
    /// The key as the schema writes it.
    pub key: String,
    /// The property path for people, e.g. `steps[1].equipment_id`.
    pub path: String,
    pub label: String,
    pub semantic: Semantic,
    pub required: bool,
    pub nullable: bool,
    /// `None` when the property is absent from the object.
    pub value: Option<Value>,
    pub surface: Option<String>,
    /// How the surface form was normalised into the JSON value.
    pub note: Option<String>,
    /// Labels of enclosing objects / array items, outermost first.
    pub context: Vec<String>,
}

/// Walks `object` along `schema` and lists every leaf property (absent ones too).
pub fn facts<R: Rng>(schema: &Value, object: &Value, rng: &mut R) -> Vec<Fact> {
    let mut out = Vec::new();
    walk(schema, schema, object, "", "", &mut Vec::new(), &mut out, rng);
    out
}

#[allow(clippy::too_many_arguments)]
fn walk<R: Rng>(root: &Value, node: &Value, value: &Value, pointer: &str, path: &str, ctx: &mut Vec<String>, out: &mut Vec<Fact>, rng: &mut R) {
    let node = resolve(root, node);
    let node = pick_branch(root, node, value);
    let Some(props) = node.get("properties").and_then(Value::as_object) else { return };
    let required: Vec<&str> = node.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    for (key, p) in props {
        let p = pick_branch(root, resolve(root, p), value.get(key).unwrap_or(&Value::Null));
        let v = value.get(key);
        let ptr = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
        let pth = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        let label = label_for(key, rng);
        let is_object = p.get("properties").is_some();
        let item_schema = p.get("items").map(|i| pick_branch(root, resolve(root, i), &Value::Null));
        match v {
            Some(obj @ Value::Object(_)) if is_object => {
                ctx.push(label);
                walk(root, p, obj, &ptr, &pth, ctx, out, rng);
                ctx.pop();
            }
            Some(Value::Array(items)) if item_schema.is_some_and(|s| s.get("properties").is_some()) => {
                for (i, item) in items.iter().enumerate() {
                    ctx.push(format!("{} {}", label, i + 1));
                    if let Some(s) = item_schema {
                        walk(root, s, item, &format!("{ptr}/{i}"), &format!("{pth}[{i}]"), ctx, out, rng);
                    }
                    ctx.pop();
                }
                if items.is_empty() {
                    out.push(absent(key, &ptr, &pth, label, p, &required, ctx, Some(Value::Array(vec![]))));
                }
            }
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let sem = infer(key, item_schema.unwrap_or(p));
                    let (s, note) = surface(sem, item, rng);
                    out.push(Fact {
                        pointer: format!("{ptr}/{i}"),
                        key: key.clone(),
                        path: format!("{pth}[{i}]"),
                        label: format!("{label} {}", i + 1),
                        semantic: sem,
                        required: required.contains(&key.as_str()),
                        nullable: false,
                        value: Some(item.clone()),
                        surface: Some(s),
                        note,
                        context: ctx.clone(),
                    });
                }
                if items.is_empty() {
                    out.push(absent(key, &ptr, &pth, label, p, &required, ctx, Some(Value::Array(vec![]))));
                }
            }
            Some(Value::Null) | None => out.push(absent(key, &ptr, &pth, label, p, &required, ctx, v.cloned())),
            Some(leaf) => {
                let sem = infer(key, p);
                let (s, note) = surface(sem, leaf, rng);
                out.push(Fact {
                    pointer: ptr,
                    key: key.clone(),
                    path: pth,
                    label,
                    semantic: sem,
                    required: required.contains(&key.as_str()),
                    nullable: is_nullable(p),
                    value: Some(leaf.clone()),
                    surface: Some(s),
                    note,
                    context: ctx.clone(),
                });
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn absent(key: &str, ptr: &str, path: &str, label: String, p: &Value, required: &[&str], ctx: &[String], value: Option<Value>) -> Fact {
    Fact {
        pointer: ptr.to_string(),
        key: key.to_string(),
        path: path.to_string(),
        label,
        semantic: infer(key, p),
        required: required.contains(&key),
        nullable: true,
        value,
        surface: None,
        note: None,
        context: ctx.to_vec(),
    }
}

/// For `anyOf`/`oneOf`, the branch that describes `value` (objects prefer an object branch).
fn pick_branch<'a>(root: &'a Value, node: &'a Value, value: &Value) -> &'a Value {
    for c in ["anyOf", "oneOf"] {
        if let Some(bs) = node.get(c).and_then(Value::as_array) {
            let want_null = value.is_null();
            return bs
                .iter()
                .map(|b| resolve(root, b))
                .find(|b| (b.get("type") == Some(&Value::from("null"))) == want_null)
                .unwrap_or(node);
        }
    }
    node
}

fn is_nullable(p: &Value) -> bool {
    matches!(p.get("type"), Some(Value::Array(t)) if t.iter().any(|x| x == "null"))
}

const ABBREVIATIONS: &[(&str, &str)] = &[
    ("number", "No."),
    ("temperature", "Temp"),
    ("description", "Desc"),
    ("percent", "%"),
    ("identifier", "ID"),
    ("id", "ID"),
    ("minutes", "min"),
    ("quantity", "Qty"),
    ("date", "Dt"),
    ("approved", "Appr."),
    ("reference", "Ref."),
];

/// A human label for a key: plain words, capitalised, or abbreviated.
fn label_for<R: Rng>(key: &str, rng: &mut R) -> String {
    let words = key_words(key);
    match rng.random_range(0..3) {
        0 => words.join(" "),
        1 => {
            let mut s = words.join(" ");
            if let Some(f) = s.get(0..1) {
                s = f.to_uppercase() + &s[1..];
            }
            s
        }
        _ => words
            .iter()
            .map(|w| ABBREVIATIONS.iter().find(|(k, _)| k == w).map_or_else(|| w.clone(), |(_, a)| a.to_string()))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Builds text and records spans as values are appended.
struct Builder {
    text: String,
    spans: Vec<Span>,
}

impl Builder {
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }
    fn value(&mut self, fact: &Fact) {
        if let Some(s) = &fact.surface {
            let start = self.text.len();
            self.text.push_str(s);
            self.spans.push(Span {
                pointer: fact.pointer.clone(),
                surface: s.clone(),
                start,
                end: self.text.len(),
            });
        }
    }
}

/// A rendered document.
pub struct Rendered {
    pub text: String,
    pub spans: Vec<Span>,
    pub distractors: Vec<String>,
}

/// Renders `facts` of a document titled `title` in `style`.
pub fn render<R: Rng>(title: &str, facts: &[Fact], style: Style, rng: &mut R) -> Rendered {
    let mut order: Vec<&Fact> = facts.iter().filter(|f| f.surface.is_some() || f.value.as_ref().is_some_and(Value::is_null)).collect();
    // Shuffle within each context group, keeping groups together.
    if rng.random_bool(0.6) {
        let mut groups: Vec<Vec<&Fact>> = Vec::new();
        for f in order {
            match groups.last_mut() {
                Some(g) if g[0].context == f.context => g.push(f),
                _ => groups.push(vec![f]),
            }
        }
        for g in &mut groups {
            g.shuffle(rng);
        }
        order = groups.into_iter().flatten().collect();
    }
    let distractors: Vec<String> = (0..rng.random_range(0..=2)).map(|_| distractor(rng)).collect();
    let mut slots: Vec<usize> = distractors.iter().map(|_| rng.random_range(0..=order.len())).collect();
    slots.sort_unstable();
    let mut b = Builder { text: String::new(), spans: Vec::new() };
    let author = values::person(rng);
    match style {
        Style::Email => b.push(&format!("Subject: {title}\n\nHi team,\n\nplease find the details below.\n\n")),
        Style::Legacy => b.push(&format!("{}\n{}\n", title.to_uppercase(), "=".repeat(title.len().min(40)))),
        Style::Table => b.push(&format!("{title}\n\n| Field | Value |\n|---|---|\n")),
        Style::Log => b.push(&format!("# export: {title}\n")),
        _ => b.push(&format!("{title}\n\n")),
    }
    let mut current_ctx: Vec<String> = Vec::new();
    let mut d = 0;
    for (i, f) in order.iter().enumerate() {
        while d < slots.len() && slots[d] == i {
            write_distractor(&mut b, &distractors[d], style, rng);
            d += 1;
        }
        if f.context != current_ctx {
            write_context(&mut b, &f.context, style);
            current_ctx = f.context.clone();
        }
        write_fact(&mut b, f, style, i, rng);
    }
    while d < distractors.len() {
        write_distractor(&mut b, &distractors[d], style, rng);
        d += 1;
    }
    match style {
        Style::Email => b.push(&format!("\nBest regards,\n{author}\n")),
        Style::Narrative => b.push(&format!("\nPrepared by {author}.\n")),
        _ => {}
    }
    Rendered { text: b.text, spans: b.spans, distractors }
}

fn write_context(b: &mut Builder, ctx: &[String], style: Style) {
    let Some(last) = ctx.last() else { return };
    let depth = ctx.len();
    match style {
        Style::Narrative | Style::Email => b.push(&format!("\nRegarding {}:\n", ctx.join(" / "))),
        Style::Legacy => b.push(&format!("--- {} ---\n", last.to_uppercase())),
        Style::Bullets => b.push(&format!("{}- {}:\n", "  ".repeat(depth - 1), last)),
        Style::Table => b.push(&format!("| **{}** | |\n", ctx.join(" / "))),
        Style::Log => {}
    }
}

fn write_fact<R: Rng>(b: &mut Builder, f: &Fact, style: Style, i: usize, rng: &mut R) {
    let null = f.surface.is_none();
    let label = &f.label;
    match style {
        Style::Narrative | Style::Email => {
            if null {
                b.push(&format!("The {label} was not recorded.\n"));
                return;
            }
            let (pre, post) = match rng.random_range(0..4) {
                0 => (format!("The {label} was "), ".\n".to_string()),
                1 => (format!("{label}: "), ".\n".to_string()),
                2 => (format!("It was recorded that the {label} is "), ".\n".to_string()),
                _ => (String::new(), format!(" was noted as the {label}.\n")),
            };
            b.push(&pre);
            b.value(f);
            b.push(&post);
        }
        Style::Legacy => {
            b.push(&format!("{}: ", label.to_uppercase()));
            if null {
                b.push("N/A");
            } else {
                b.value(f);
            }
            // OCR-like: fields sometimes run on one line, sometimes break twice.
            b.push(match rng.random_range(0..4) {
                0 => "   ",
                1 => "\n\n",
                _ => "\n",
            });
        }
        Style::Bullets => {
            b.push(&format!("{}- {label}: ", "  ".repeat(f.context.len())));
            if null {
                b.push("n/a");
            } else {
                b.value(f);
            }
            b.push("\n");
        }
        Style::Table => {
            b.push(&format!("| {label} | "));
            if null {
                b.push("—");
            } else {
                b.value(f);
            }
            b.push(" |\n");
        }
        Style::Log => {
            let ctx = f.context.join("/");
            b.push(&format!("2024-01-01T08:{:02}:{:02}Z INFO {ctx}{}{}=", (i / 60) % 60, i % 60, if ctx.is_empty() { "" } else { "." }, label.replace(' ', "_")));
            if null {
                b.push("null");
            } else {
                b.value(f);
            }
            b.push("\n");
        }
    }
}

fn write_distractor<R: Rng>(b: &mut Builder, text: &str, style: Style, rng: &mut R) {
    match style {
        Style::Bullets => b.push(&format!("- note: {text}\n")),
        Style::Table => b.push(&format!("| note | {text} |\n")),
        Style::Log => b.push(&format!("2024-01-01T07:59:{:02}Z DEBUG {text}\n", rng.random_range(0..60))),
        Style::Legacy => b.push(&format!("NOTE: {}\n", text.to_uppercase())),
        _ => b.push(&format!("{text}\n")),
    }
}

/// A sentence with values that belong to no schema field.
fn distractor<R: Rng>(rng: &mut R) -> String {
    let n = rng.random_range(10..99);
    let options = [
        format!("Room pressure differential read {n}.{} Pa (information only).", rng.random_range(0..10)),
        format!("Drawing DWG-{n}{n} rev {} was consulted.", ["A", "B", "C"].choose(rng).unwrap_or(&"A")),
        format!("Previous campaign lot LOT-2018-00{n} is not part of this record."),
        format!("Call extension 4{n}1 with questions."),
        format!("Coffee machine on level {} was out of order.", n % 5),
        format!("Ambient noise measured {n} dB during the shift."),
    ];
    options.choose(rng).cloned().unwrap_or_default()
}
