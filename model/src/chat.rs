//! Chat templates: the model's own Jinja `chat_template`, rendered with minijinja the way
//! transformers' `apply_chat_template` does (trim/lstrip blocks, Python string methods, a
//! Python-compatible `tojson`).

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// Left out of the template context when `None`, as a Python dict without the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
            reasoning_content: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// ChatML, for models that ship no template.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("eos_token", &self.eos_token).finish()
    }
}

impl ChatTemplate {
    /// Compiles a Jinja source.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", python_tojson);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("cannot compile: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// ChatML fallback.
    pub fn chatml() -> Self {
        // The constant is known to compile; fall back to an empty env is impossible here.
        match Self::new(CHATML_TEMPLATE, "", "<|im_end|>") {
            Ok(t) => t,
            Err(e) => unreachable!("built-in ChatML template: {e}"),
        }
    }

    /// Reads `chat_template` (a string, or a list of named templates — `default` is used)
    /// from `tokenizer_config.json` (a file or a model directory); ChatML if it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer_config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| ModelError::io(&file, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|cause| ModelError::Json {
            path: file.clone(),
            cause,
        })?;
        let token = |key: &str| -> String {
            v.get(key)
                .and_then(|t| t.as_str().or_else(|| t.get("content").and_then(|c| c.as_str())))
                .unwrap_or("")
                .to_string()
        };
        let source = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .ok_or_else(|| ModelError::Template(format!("{}: no `default` chat template", file.display())))?
                .to_string(),
            _ => return Ok(Self::chatml()),
        };
        Self::new(&source, &token("bos_token"), &token("eos_token"))
    }

    /// Renders a conversation; `add_generation_prompt` opens the assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, None)
    }

    /// Like [`ChatTemplate::render`], with extra template variables (e.g. `enable_thinking`).
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: Option<&serde_json::Value>,
    ) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let base = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        let ctx = match extra {
            Some(extra) => minijinja::context! { ..Value::from_serialize(extra), ..base },
            None => base,
        };
        template.render(ctx).map_err(|e| ModelError::Template(format!("render: {e:#}")))
    }
}

/// `tojson` as Python's `json.dumps(x, ensure_ascii=False)`: `", "` and `": "` separators,
/// no HTML escaping (minijinja's own is compact and escapes `<>&'`).
fn python_tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)),
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}", "", "").unwrap();
        let extra = serde_json::json!({"x": {"b": [1, 2.5, "<a&b>"], "a": null, "ü": true}});
        let out = t.render_with(&[], false, Some(&extra)).unwrap();
        // json.dumps({"b": [1, 2.5, "<a&b>"], "a": None, "ü": True}, ensure_ascii=False)
        assert!(out.contains(r#""b": [1, 2.5, "<a&b>"]"#), "{out}");
        assert!(out.contains(r#""a": null"#) && out.contains(r#""ü": true"#), "{out}");
    }

    #[test]
    fn chatml_fallback_and_errors() {
        let t = ChatTemplate::chatml();
        let s = t.render(&[ChatMessage::user("hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let raising = ChatTemplate::new("{{ raise_exception('no system') }}", "", "").unwrap();
        assert!(raising.render(&[], false).unwrap_err().to_string().contains("no system"));
    }
}
