//! Query strings and path parameters as goim's tools send them: repeated names, comma lists,
//! and errors that name the parameter at fault.

use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use rim_proto::room::RoomId;

use super::ApiError;

/// A parsed query string: every `name=value` pair in order (repeated names kept).
#[derive(Debug, Clone, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses a raw query string (percent-decoding, `+` as space).
    pub fn parse(raw: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first non-empty value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name`, or `name: required`.
    pub fn required(&self, name: &str) -> Result<&str, ApiError> {
        self.get(name)
            .ok_or_else(|| ApiError::bad(format!("{name}: required")))
    }

    /// Every value of a repeated `name`; with `split_commas`, `a,b` counts as two (goim tools
    /// send both forms). Empty values are ignored.
    pub fn list(&self, name: &str, split_commas: bool) -> Vec<&str> {
        let mut out = Vec::new();
        for (_, v) in self.0.iter().filter(|(k, _)| k == name) {
            if split_commas {
                out.extend(v.split(',').map(str::trim).filter(|s| !s.is_empty()));
            } else if !v.is_empty() {
                out.push(v.as_str());
            }
        }
        out
    }

    /// Required `operation` as an int32.
    pub fn op(&self) -> Result<i32, ApiError> {
        let v = self.required("operation")?;
        v.trim()
            .parse()
            .map_err(|_| ApiError::bad(format!("operation: {v:?} is not an int32")))
    }

    /// Required list of int64 `name`, at most `max` of them.
    pub fn i64_list(&self, name: &str, max: usize) -> Result<Vec<i64>, ApiError> {
        let raw = self.list(name, true);
        if raw.is_empty() {
            return Err(ApiError::bad(format!("{name}: required")));
        }
        check_max(name, raw.len(), max)?;
        raw.into_iter()
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::bad(format!("{name}: {v:?} is not an int64")))
            })
            .collect()
    }

    /// Optional unsigned `name`, `default` when absent.
    pub fn u32_or(&self, name: &str, default: u32) -> Result<u32, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| ApiError::bad(format!("{name}: {v:?} is not a non-negative integer"))),
        }
    }

    /// Required room `type`, validated.
    pub fn room_type(&self) -> Result<&str, ApiError> {
        let ty = self.required("type")?;
        RoomId::check_type(ty).map_err(|e| ApiError::bad(format!("type: {e}")))?;
        Ok(ty)
    }
}

pub(super) fn check_max(name: &str, n: usize, max: usize) -> Result<(), ApiError> {
    if n > max {
        return Err(ApiError::bad(format!(
            "{name}: {n} values exceed push.max_targets of {max}"
        )));
    }
    Ok(())
}

/// A path parameter, percent-decoded; a malformed one is a 400 naming it.
pub(super) fn path_param(
    p: Result<Path<String>, PathRejection>,
    name: &str,
) -> Result<String, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::bad(format!("{name}: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn q(s: &str) -> Query {
        Query::parse(Some(s))
    }

    #[test]
    fn query_errors_name_the_parameter() {
        assert_eq!(q("").op().unwrap_err().message, "operation: required");
        assert_eq!(
            q("operation=abc").op().unwrap_err().message,
            "operation: \"abc\" is not an int32"
        );
        assert_eq!(q("operation=1000").op().unwrap(), 1000);
        assert_eq!(
            q("mids=1&mids=12x")
                .i64_list("mids", 10)
                .unwrap_err()
                .message,
            "mids: \"12x\" is not an int64"
        );
        assert_eq!(
            q("x=1").i64_list("mids", 10).unwrap_err().message,
            "mids: required"
        );
        assert_eq!(
            q("mids=1,2,3").i64_list("mids", 2).unwrap_err().message,
            "mids: 3 values exceed push.max_targets of 2"
        );
        assert_eq!(
            q("mids=1&mids=2,3").i64_list("mids", 10).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(q("").room_type().unwrap_err().message, "type: required");
        assert!(
            q("type=a%20b")
                .room_type()
                .unwrap_err()
                .message
                .starts_with("type: ")
        );
        assert_eq!(q("keys=a,b&keys=c").list("keys", false), vec!["a,b", "c"]);
        assert_eq!(
            q("speed=-1").u32_or("speed", 0).unwrap_err().message,
            "speed: \"-1\" is not a non-negative integer"
        );
    }
}
