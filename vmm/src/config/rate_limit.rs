//! A device's rate limits as the user gives them (`--disk-limit`,
//! `--net ...,limit=`, the API); the token buckets that keep them are the
//! guest process's (`guest::devices::rate_limiter`).

use serde::{Deserialize, Serialize};

/// A device's limits: bytes and operations (requests, frames) per second,
/// each with a burst (default: one second's worth).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub bytes_per_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub bytes_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub ops_per_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1)]
    pub ops_burst: Option<u64>,
}

impl RateLimit {
    /// Parses `bytes=N,ops=N,bytes-burst=N,ops-burst=N` (any of them;
    /// sizes may end in K, M or G, powers of 1024).
    pub fn parse_cli(s: &str) -> Result<RateLimit, String> {
        let mut limit = RateLimit::default();
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("{part:?} is not KEY=VALUE"))?;
            let field = match key {
                "bytes" => &mut limit.bytes_per_s,
                "bytes-burst" => &mut limit.bytes_burst,
                "ops" => &mut limit.ops_per_s,
                "ops-burst" => &mut limit.ops_burst,
                _ => return Err(format!("unknown limit {key:?} (bytes, ops, bytes-burst, ops-burst)")),
            };
            *field = Some(parse_size(value)?);
        }
        limit.validate()?;
        Ok(limit)
    }

    pub fn validate(&self) -> Result<(), String> {
        let all = [self.bytes_per_s, self.bytes_burst, self.ops_per_s, self.ops_burst];
        if all.contains(&Some(0)) {
            return Err("a limit of 0 would stop the device for good".into());
        }
        if self.bytes_burst.is_some() && self.bytes_per_s.is_none()
            || self.ops_burst.is_some() && self.ops_per_s.is_none()
        {
            return Err("a burst goes with its rate (bytes or ops)".into());
        }
        if self.bytes_per_s.is_none() && self.ops_per_s.is_none() {
            return Err("give bytes or ops per second".into());
        }
        Ok(())
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a number (like 100, 64K, 10M)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s} is too large"))
}
