//! Room ids: `type://id`, as goim writes them (`live://1000`).
//!
//! The type is what pushes and online queries select by (`/goim/push/room?type=live&room=1000`);
//! the id is opaque. Both are bounded so a client cannot make the comet hold huge keys.

use std::fmt;

/// Longest room type accepted.
pub const MAX_TYPE_LEN: usize = 32;
/// Longest room id (after `://`) accepted.
pub const MAX_ID_LEN: usize = 128;

/// A validated room id.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct RoomId(String);

/// Why a room id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomIdError {
    /// No `://` separator.
    #[error("room id {0:?} is not of the form type://id")]
    NoSeparator(String),
    /// Type empty, too long or with characters outside `[A-Za-z0-9_.-]`.
    #[error("room type {0:?} must be 1-32 characters of A-Z a-z 0-9 _ . -")]
    BadType(String),
    /// Id empty, too long, or containing whitespace or control characters.
    #[error("room id part {0:?} must be 1-128 characters without whitespace or control characters")]
    BadId(String),
}

impl RoomId {
    /// Parses and validates `type://id`.
    pub fn parse(s: &str) -> Result<RoomId, RoomIdError> {
        let (ty, id) = s
            .split_once("://")
            .ok_or_else(|| RoomIdError::NoSeparator(s.to_string()))?;
        Self::check_type(ty)?;
        if id.is_empty()
            || id.len() > MAX_ID_LEN
            || id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(RoomIdError::BadId(id.to_string()));
        }
        Ok(RoomId(s.to_string()))
    }

    /// Builds `type://id` from its parts (HTTP push and online routes take them apart).
    pub fn from_parts(ty: &str, id: &str) -> Result<RoomId, RoomIdError> {
        Self::parse(&format!("{ty}://{id}"))
    }

    /// Validates a room type alone.
    pub fn check_type(ty: &str) -> Result<(), RoomIdError> {
        let ok = !ty.is_empty()
            && ty.len() <= MAX_TYPE_LEN
            && ty
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(())
        } else {
            Err(RoomIdError::BadType(ty.to_string()))
        }
    }

    /// The room type (before `://`).
    pub fn room_type(&self) -> &str {
        self.0.split_once("://").map(|(t, _)| t).unwrap_or_default()
    }

    /// The id part (after `://`).
    pub fn id_part(&self) -> &str {
        self.0.split_once("://").map(|(_, i)| i).unwrap_or_default()
    }

    /// The whole `type://id`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RoomId {
    type Error = RoomIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RoomId::parse(&s)
    }
}

impl From<RoomId> for String {
    fn from(r: RoomId) -> String {
        r.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_goim_rooms() {
        let r = RoomId::parse("live://1000").unwrap();
        assert_eq!((r.room_type(), r.id_part()), ("live", "1000"));
        assert_eq!(
            RoomId::from_parts("chat", "a/b").unwrap().as_str(),
            "chat://a/b"
        );
    }

    #[test]
    fn rejects_bad_syntax() {
        assert!(matches!(
            RoomId::parse("live1000"),
            Err(RoomIdError::NoSeparator(_))
        ));
        assert!(matches!(
            RoomId::parse("://1"),
            Err(RoomIdError::BadType(_))
        ));
        assert!(matches!(
            RoomId::parse("li ve://1"),
            Err(RoomIdError::BadType(_))
        ));
        assert!(matches!(
            RoomId::parse("live://"),
            Err(RoomIdError::BadId(_))
        ));
        assert!(matches!(
            RoomId::parse("live://a b"),
            Err(RoomIdError::BadId(_))
        ));
        assert!(RoomId::parse(&format!("live://{}", "x".repeat(129))).is_err());
    }
}
