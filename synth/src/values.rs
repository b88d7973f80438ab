//! What a field means (from its key, description, format and pattern), realistic values for
//! it, and the several ways a value is written in a document ("surface forms").

use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::Value;

use crate::domain::*;
use crate::error::SynthError;
use crate::schema_ops::key_words;

/// The meaning of a leaf field, inferred from the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantic {
    Id,
    Person,
    Role,
    Department,
    Site,
    Product,
    Material,
    Supplier,
    Instrument,
    Location,
    Unit,
    TestName,
    Area,
    Title,
    FreeText,
    Date,
    DateTime,
    Email,
    Uuid,
    Temperature,
    Percent,
    Ph,
    Micrograms,
    Litres,
    Minutes,
    Count,
    Number,
    Bool,
    Enum,
}

impl Semantic {
    /// A human label for the kind of value (used in reasoning traces).
    pub fn describe(self) -> &'static str {
        match self {
            Semantic::Id => "identifier",
            Semantic::Date => "date",
            Semantic::DateTime => "date-time",
            Semantic::Email => "e-mail address",
            Semantic::Uuid => "UUID",
            Semantic::Temperature => "temperature",
            Semantic::Percent => "percentage",
            Semantic::Ph => "pH value",
            Semantic::Micrograms | Semantic::Litres | Semantic::Minutes | Semantic::Number => "quantity",
            Semantic::Count => "count",
            Semantic::Bool => "yes/no flag",
            Semantic::Enum => "category",
            _ => "text",
        }
    }
}

/// Infers the semantic of a leaf schema node under `key`.
pub fn infer(key: &str, node: &Value) -> Semantic {
    let words = key_words(key);
    let has = |w: &str| words.iter().any(|x| x == w);
    let ty = node_type(node);
    if node.get("enum").is_some() || node.get("const").is_some() {
        return Semantic::Enum;
    }
    if node.get("pattern").is_some() {
        return Semantic::Id;
    }
    match node.get("format").and_then(Value::as_str) {
        Some("date") => return Semantic::Date,
        Some("date-time") => return Semantic::DateTime,
        Some("email") => return Semantic::Email,
        Some("uuid") => return Semantic::Uuid,
        _ => {}
    }
    match ty {
        "boolean" => Semantic::Bool,
        "integer" | "number" => {
            if has("temperature") || (has("c") && words.len() > 1) {
                Semantic::Temperature
            } else if has("ph") {
                Semantic::Ph
            } else if has("percent") || has("score") {
                Semantic::Percent
            } else if has("ug") {
                Semantic::Micrograms
            } else if has("l") {
                Semantic::Litres
            } else if has("min") || has("minutes") {
                Semantic::Minutes
            } else if ty == "integer" {
                Semantic::Count
            } else {
                Semantic::Number
            }
        }
        _ => {
            if has("name") && !has("product") || has("trainee") || has("owner") || has("technician") || has("analyst") || has("by") || has("trainer") {
                Semantic::Person
            } else if has("role") {
                Semantic::Role
            } else if has("department") {
                Semantic::Department
            } else if has("site") {
                Semantic::Site
            } else if has("product") {
                Semantic::Product
            } else if has("material") {
                Semantic::Material
            } else if has("supplier") {
                Semantic::Supplier
            } else if has("instrument") {
                Semantic::Instrument
            } else if has("location") {
                Semantic::Location
            } else if has("area") {
                Semantic::Area
            } else if has("unit") {
                Semantic::Unit
            } else if has("test") {
                Semantic::TestName
            } else if has("title") {
                Semantic::Title
            } else {
                Semantic::FreeText
            }
        }
    }
}

/// The non-null JSON type of a node (`"string"` when unspecified).
pub fn node_type(node: &Value) -> &str {
    match node.get("type") {
        Some(Value::String(t)) => t,
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("string"),
        _ => "string",
    }
}

const FIRST: &[&str] = &["Anna", "Luis", "Mei", "Omar", "Priya", "Jonas", "Fatima", "Kenji", "Sofia", "Daniel", "Ines", "Tomasz", "Grace", "Arjun", "Lena", "Mateo"];
const LAST: &[&str] = &["Schmidt", "Garcia", "Chen", "Haddad", "Nair", "Berg", "Okafor", "Tanaka", "Rossi", "Novak", "Dubois", "Kowalski", "Mensah", "Iyer", "Fischer", "Silva"];
const ROLES: &[&str] = &["QA Specialist", "Production Operator", "QC Analyst", "Shift Supervisor", "Validation Engineer", "Microbiologist", "QA Manager", "Process Engineer", "Calibration Technician"];
const DEPARTMENTS: &[&str] = &["Aseptic Filling", "Upstream Processing", "Downstream Purification", "Quality Control", "Warehouse", "Formulation", "Packaging", "Utilities"];
const SITES: &[&str] = &["Basel Plant 2", "Cork Biologics", "Singapore Tuas", "Durham NC", "Lyon Fill-Finish", "Hyderabad Unit 4"];
const PRODUCTS: &[&str] = &["Adalimumab 40 mg/0.4 mL", "Insulin glargine 100 U/mL", "Filgrastim 300 mcg", "Heparin sodium 5000 IU", "Ondansetron 2 mg/mL", "Trastuzumab 150 mg", "Saline 0.9% 500 mL"];
const MATERIALS: &[&str] = &["sucrose NF", "polysorbate 80", "sodium chloride USP", "WFI", "glass vials 2R", "bromobutyl stoppers", "L-histidine"];
const SUPPLIERS: &[&str] = &["Merck KGaA", "Avantor", "Schott AG", "West Pharmaceutical", "Lonza", "Sartorius Stedim", "Gerresheimer"];
const INSTRUMENTS: &[&str] = &["pH meter", "analytical balance", "temperature probe", "pressure gauge", "HPLC pump", "particle counter", "conductivity meter"];
const LOCATIONS: &[&str] = &["filling needle", "tank outlet valve", "LAF bench", "gowning room door", "vial tray", "mixing vessel wall", "isolator glove port"];
const AREAS: &[&str] = &["Cleanroom 3B", "Filling Suite A", "Buffer Prep Room", "Isolator 2", "Weighing Booth 1"];
const UNITS: &[&str] = &["mg/mL", "%", "EU/mL", "ppm", "mOsm/kg", "CFU/mL"];
const TESTS: &[&str] = &["Endotoxin", "Osmolality", "Appearance", "Sterility", "Particulate matter", "Identity by HPLC", "Bioburden"];
const TITLES: &[&str] = &["Replace filter housing gaskets", "Update line clearance checklist", "Relocate temperature probe", "New supplier for stoppers", "Extend hold time of buffer"];
const SENTENCES: &[&str] = &[
    "Filter integrity test repeated after wetting issue",
    "Operator noted condensation on the tank lid",
    "Alarm acknowledged and cleared within two minutes",
    "Gasket replaced during planned maintenance",
    "Label reconciliation showed two missing labels",
    "Root cause traced to a worn peristaltic tube",
    "Retrain staff on aseptic gowning",
    "Additional sampling performed as precaution",
    "No impact on product quality expected",
    "Investigation ongoing with engineering",
    "Line clearance signed before start",
    "Hold time exceeded by fifteen minutes",
];
const EMAIL_DOMAINS: &[&str] = &["pharma-co.com", "biolabs.eu", "qa.example.org", "plant2.example.com"];

/// A random person's name.
pub fn person<R: Rng>(rng: &mut R) -> String {
    format!("{} {}", pick(FIRST, rng), pick(LAST, rng))
}

fn pick<R: Rng>(list: &[&str], rng: &mut R) -> String {
    list.choose(rng).copied().unwrap_or("n/a").to_string()
}

fn digits<R: Rng>(n: usize, rng: &mut R) -> String {
    (0..n).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect()
}

fn letters<R: Rng>(n: usize, rng: &mut R) -> String {
    (0..n).map(|_| char::from(b'A' + rng.random_range(0..26u8))).collect()
}

/// A value matching one of the domain's id patterns.
pub fn id_for_pattern<R: Rng>(pattern: &str, rng: &mut R) -> Result<String, SynthError> {
    Ok(match pattern {
        LOT_PATTERN => format!("LOT-{}-{}", rng.random_range(2019..2027), digits(4, rng)),
        BATCH_PATTERN => format!("B{}", digits(6, rng)),
        EQUIPMENT_PATTERN => format!("EQ-{}-{}", letters(2, rng), digits(3, rng)),
        DEVIATION_PATTERN => format!("DEV-{}-{}", rng.random_range(2019..2027), digits(3, rng)),
        CAPA_PATTERN => format!("CAPA-{}", digits(5, rng)),
        CHANGE_PATTERN => format!("CC-{}-{}", rng.random_range(2019..2027), digits(2, rng)),
        SOP_PATTERN => format!("SOP-{}-{}", letters(rng.random_range(2..=3), rng), digits(3, rng)),
        PRODUCT_CODE_PATTERN => format!("{}-{}", letters(3, rng), digits(3, rng)),
        other => return Err(SynthError::UnknownPattern(other.to_string())),
    })
}

/// A calendar date as (year, month, day).
pub fn date<R: Rng>(rng: &mut R) -> (i32, u32, u32) {
    (rng.random_range(2019..=2026), rng.random_range(1..=12), rng.random_range(1..=28))
}

/// Default range and decimals of a numeric semantic.
fn numeric_profile(sem: Semantic) -> (f64, f64, u32) {
    match sem {
        Semantic::Temperature => (-25.0, 40.0, 1),
        Semantic::Percent => (80.0, 100.0, 1),
        Semantic::Ph => (5.5, 8.0, 2),
        Semantic::Micrograms => (0.5, 50.0, 2),
        Semantic::Litres => (50.0, 5000.0, 1),
        Semantic::Minutes => (5.0, 240.0, 0),
        Semantic::Count => (0.0, 60.0, 0),
        _ => (0.0, 500.0, 2),
    }
}

/// Generates a leaf value that satisfies `node` (bounds, pattern, format, length).
pub fn leaf<R: Rng>(sem: Semantic, node: &Value, rng: &mut R) -> Result<Value, SynthError> {
    if let Some(options) = node.get("enum").and_then(Value::as_array) {
        let non_null: Vec<&Value> = options.iter().filter(|v| !v.is_null()).collect();
        return Ok(non_null.choose(rng).map(|v| (*v).clone()).unwrap_or(Value::Null));
    }
    if let Some(c) = node.get("const") {
        return Ok(c.clone());
    }
    let ty = node_type(node);
    match ty {
        "boolean" => Ok(Value::Bool(rng.random_bool(0.6))),
        "integer" | "number" => {
            let (lo, hi, mut decimals) = numeric_profile(sem);
            let min = node.get("minimum").and_then(Value::as_f64);
            let max = node.get("maximum").and_then(Value::as_f64);
            let (mut lo, mut hi) = (min.map_or(lo, |m| lo.max(m)), max.map_or(hi, |m| hi.min(m)));
            if lo > hi {
                (lo, hi) = (min.unwrap_or(hi), max.unwrap_or(lo));
            }
            if ty == "integer" {
                decimals = 0;
            }
            let scale = 10f64.powi(decimals as i32);
            let (lo_i, hi_i) = ((lo * scale).ceil() as i64, (hi * scale).floor() as i64);
            let n = if hi_i >= lo_i { rng.random_range(lo_i..=hi_i) } else { lo_i };
            Ok(if decimals == 0 {
                Value::from(n)
            } else {
                Value::from(n as f64 / scale)
            })
        }
        _ => {
            if let Some(p) = node.get("pattern").and_then(Value::as_str) {
                return id_for_pattern(p, rng).map(Value::String);
            }
            let text = match node.get("format").and_then(Value::as_str) {
                Some("date") => {
                    let (y, m, d) = date(rng);
                    format!("{y:04}-{m:02}-{d:02}")
                }
                Some("date-time") => {
                    let (y, m, d) = date(rng);
                    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:00Z", rng.random_range(0..24), rng.random_range(0..60))
                }
                Some("email") => {
                    let (f, l) = (pick(FIRST, rng).to_lowercase(), pick(LAST, rng).to_lowercase());
                    format!("{f}.{l}@{}", pick(EMAIL_DOMAINS, rng))
                }
                Some("uuid") => {
                    let hex = |n: usize, rng: &mut R| -> String {
                        (0..n).map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0')).collect()
                    };
                    format!("{}-{}-4{}-a{}-{}", hex(8, rng), hex(4, rng), hex(3, rng), hex(3, rng), hex(12, rng))
                }
                _ => match sem {
                    Semantic::Person => person(rng),
                    Semantic::Role => pick(ROLES, rng),
                    Semantic::Department => pick(DEPARTMENTS, rng),
                    Semantic::Site => pick(SITES, rng),
                    Semantic::Product => pick(PRODUCTS, rng),
                    Semantic::Material => pick(MATERIALS, rng),
                    Semantic::Supplier => pick(SUPPLIERS, rng),
                    Semantic::Instrument => pick(INSTRUMENTS, rng),
                    Semantic::Location => pick(LOCATIONS, rng),
                    Semantic::Area => pick(AREAS, rng),
                    Semantic::Unit => pick(UNITS, rng),
                    Semantic::TestName => pick(TESTS, rng),
                    Semantic::Title => pick(TITLES, rng),
                    _ => pick(SENTENCES, rng),
                },
            };
            let max_len = node.get("maxLength").and_then(Value::as_u64).map_or(usize::MAX, |m| m as usize);
            let min_len = node.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
            let mut text: String = text.chars().take(max_len).collect();
            while text.chars().count() < min_len {
                text.push('x');
            }
            Ok(Value::String(text))
        }
    }
}

const MONTHS: &[&str] = &["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

/// How `value` (of semantic `sem`) is written in a document, and a note on the normalisation
/// the reader must do (for the reasoning trace), or `None` when written as in the JSON.
pub fn surface<R: Rng>(sem: Semantic, value: &Value, rng: &mut R) -> (String, Option<String>) {
    match (sem, value) {
        (Semantic::Date, Value::String(s)) => match parse_date(s) {
            Some((y, m, d)) => {
                let month = MONTHS[(m as usize).saturating_sub(1) % 12];
                let forms = [
                    s.clone(),
                    format!("{d} {month} {y}"),
                    format!("{month} {d}, {y}"),
                    format!("{d:02}-{}-{y}", month[..3].to_uppercase()),
                    format!("{d:02}.{m:02}.{y}"),
                    format!("{y}/{m:02}/{d:02}"),
                ];
                let i = rng.random_range(0..forms.len());
                let note = (i > 0).then(|| "a date, normalised to ISO 8601 (YYYY-MM-DD)".to_string());
                (forms[i].clone(), note)
            }
            None => (s.clone(), None),
        },
        (Semantic::DateTime, Value::String(s)) => match (parse_date(s), s.get(11..16)) {
            (Some((y, m, d)), Some(hm)) => {
                let month = MONTHS[(m as usize).saturating_sub(1) % 12];
                let forms = [
                    s.clone(),
                    format!("{y}-{m:02}-{d:02} {hm} UTC"),
                    format!("{d} {month} {y}, {hm} UTC"),
                    format!("{d:02}-{}-{y} {hm}Z", month[..3].to_uppercase()),
                ];
                let i = rng.random_range(0..forms.len());
                let note = (i > 0).then(|| "a timestamp, normalised to RFC 3339 in UTC".to_string());
                (forms[i].clone(), note)
            }
            _ => (s.clone(), None),
        },
        (Semantic::Bool, Value::Bool(b)) => {
            let forms: &[(&str, &str)] = &[("yes", "no"), ("Y", "N"), ("true", "false"), ("confirmed", "not confirmed"), ("✓", "✗")];
            let (t, f) = forms.choose(rng).copied().unwrap_or(("yes", "no"));
            let word = if *b { t } else { f };
            let note = (word != "true" && word != "false").then(|| format!("\"{word}\" read as the boolean {b}"));
            (word.to_string(), note)
        }
        (Semantic::Enum, Value::String(s)) => {
            let forms = [s.clone(), s.to_uppercase(), s.replace('_', " ")];
            let i = rng.random_range(0..forms.len());
            let note = (forms[i] != *s).then(|| format!("mapped to the schema's enum value \"{s}\""));
            (forms[i].clone(), note)
        }
        (_, Value::Number(n)) => {
            let plain = n.to_string();
            let unit = match sem {
                Semantic::Temperature => [" °C", " degC", " degrees Celsius", "°C"].choose(rng).copied(),
                Semantic::Percent => ["%", " %", " percent"].choose(rng).copied(),
                Semantic::Micrograms => [" µg", " ug", " micrograms"].choose(rng).copied(),
                Semantic::Litres => [" L", " litres", " l"].choose(rng).copied(),
                Semantic::Minutes => [" min", " minutes"].choose(rng).copied(),
                _ => Some(""),
            }
            .unwrap_or("");
            let digits = if n.as_f64().is_some_and(|v| v.abs() >= 1000.0) && rng.random_bool(0.5) {
                with_thousands(&plain)
            } else {
                plain.clone()
            };
            let text = format!("{digits}{unit}");
            let note = match (unit.is_empty(), digits != plain) {
                (true, false) => None,
                (false, false) => Some(format!("the unit \"{}\" dropped, number kept", unit.trim())),
                (_, true) => Some("thousands separators removed".to_string()),
            };
            (text, note)
        }
        (_, Value::String(s)) => (s.clone(), None),
        (_, other) => (other.to_string(), None),
    }
}

fn with_thousands(plain: &str) -> String {
    let (int, frac) = plain.split_once('.').map_or((plain, None), |(a, b)| (a, Some(b)));
    let (sign, int) = int.strip_prefix('-').map_or(("", int), |r| ("-", r));
    let mut out = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

fn parse_date(s: &str) -> Option<(i32, u32, u32)> {
    let y = s.get(0..4)?.parse().ok()?;
    let m = s.get(5..7)?.parse().ok()?;
    let d = s.get(8..10)?.parse().ok()?;
    Some((y, m, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn thousands() {
        assert_eq!(with_thousands("12500.5"), "12,500.5");
        assert_eq!(with_thousands("-1000"), "-1,000");
        assert_eq!(with_thousands("999"), "999");
    }

    #[test]
    fn numbers_respect_bounds() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let node = serde_json::json!({"type": "number", "minimum": 2.0, "maximum": 3.0});
        for _ in 0..200 {
            let v = leaf(Semantic::Temperature, &node, &mut rng).unwrap().as_f64().unwrap();
            assert!((2.0..=3.0).contains(&v), "{v}");
        }
        assert!(id_for_pattern("^X$", &mut rng).is_err());
    }
}
