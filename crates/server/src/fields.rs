//! Typed reads of a JSON request body's fields, each failure a 400 naming the field and what
//! it should have been. serde's own messages ("invalid type: string, expected f32 at line 1
//! column 20") do not say which field was wrong.

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

/// The body as a JSON object, or a 400 saying why it is not one.
pub fn parse_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        other => Err(ApiError::invalid(format!(
            "the request body must be a JSON object, not {}",
            kind(&other)
        ))),
    }
}

/// "a string", "an array", ...: what a value is, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields of one JSON object; `path` is its place in the body (`messages[1]`), empty at
/// the top level.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: String,
}

impl<'a> Fields<'a> {
    pub fn new(obj: &'a Map<String, Value>, path: impl Into<String>) -> Self {
        Self {
            obj,
            path: path.into(),
        }
    }

    /// The dotted name of field `name` within the body.
    pub fn param(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn wrong(&self, name: &str, want: &str, got: &Value) -> ApiError {
        let p = self.param(name);
        ApiError::field(&p, format!("`{p}` must be {want}, not {}", kind(got)))
    }

    /// The field's value; an explicit `null` counts as absent, as in OpenAI's API.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    pub fn require(&self, name: &str) -> ApiResult<&'a Value> {
        self.get(name).ok_or_else(|| {
            let p = self.param(name);
            ApiError::field(&p, format!("`{p}` is required"))
        })
    }

    pub fn str(&self, name: &str) -> ApiResult<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(name, "a string", v)),
        }
    }

    pub fn bool(&self, name: &str) -> ApiResult<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(name, "a boolean", v)),
        }
    }

    /// A number that fits an f32 (1e39 would silently become infinity).
    pub fn f32(&self, name: &str) -> ApiResult<Option<f32>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().map(|x| x as f32).filter(|x| x.is_finite());
                x.map(Some).ok_or_else(|| {
                    let p = self.param(name);
                    ApiError::field(&p, format!("`{p}` must be a finite number, not {n}"))
                })
            }
            Some(v) => Err(self.wrong(name, "a number", v)),
        }
    }

    /// A whole number >= 0.
    pub fn u64(&self, name: &str) -> ApiResult<Option<u64>> {
        self.whole(name, serde_json::Number::as_u64, "a whole number >= 0")
    }

    /// A whole number, possibly negative.
    pub fn i64(&self, name: &str) -> ApiResult<Option<i64>> {
        self.whole(name, serde_json::Number::as_i64, "a whole number")
    }

    /// A number that `convert` takes exactly; `what` names the range in the error.
    fn whole<T>(
        &self,
        name: &str,
        convert: fn(&serde_json::Number) -> Option<T>,
        what: &str,
    ) -> ApiResult<Option<T>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => convert(n).map(Some).ok_or_else(|| {
                let p = self.param(name);
                ApiError::field(&p, format!("`{p}` must be {what}, not {n}"))
            }),
            Some(v) => Err(self.wrong(name, "a whole number", v)),
        }
    }

    pub fn object(&self, name: &str) -> ApiResult<Option<Fields<'a>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(Fields::new(o, self.param(name)))),
            Some(v) => Err(self.wrong(name, "an object", v)),
        }
    }

    pub fn array(&self, name: &str) -> ApiResult<Option<&'a Vec<Value>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(name, "an array", v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn wrong_types_name_the_field_and_the_type() {
        let o = obj(json!({"temperature": "hot", "n": -1, "stream": 1, "rf": {"type": 3}}));
        let f = Fields::new(&o, "");
        let e = f.f32("temperature").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert_eq!(e.message, "`temperature` must be a number, not a string");
        assert!(f
            .u64("n")
            .unwrap_err()
            .message
            .contains("whole number >= 0"));
        assert!(f.bool("stream").unwrap_err().message.contains("boolean"));
        let rf = f.object("rf").unwrap().unwrap();
        let e = rf.str("type").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("rf.type"));
        assert_eq!(
            f.require("model").unwrap_err().message,
            "`model` is required"
        );
    }

    #[test]
    fn null_is_absent() {
        let o = obj(json!({"temperature": null}));
        assert_eq!(Fields::new(&o, "").f32("temperature").unwrap(), None);
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        assert!(parse_object(b"{\"a\": ")
            .unwrap_err()
            .message
            .starts_with("the request body is not valid JSON"));
        assert!(parse_object(b"[1]")
            .unwrap_err()
            .message
            .contains("an array"));
    }
}
