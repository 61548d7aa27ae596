//! Error classes and backoff (invariant I4): transient errors retry with capped
//! exponential backoff and full jitter; permanent ones stop and become a
//! readable condition.

use std::time::Duration;

use rand::Rng;

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    Transient,
    Permanent,
}

/// Classifies a dataplane RPC error code (negative errno or JSON-RPC code).
pub fn classify_rpc_code(code: i32) -> ErrorClass {
    const PERMANENT: &[i32] = &[
        -libc_consts::EINVAL,
        -libc_consts::ENOSPC,
        -libc_consts::ENOENT,
        -libc_consts::EPERM,
        -libc_consts::EROFS,
        -32602, // invalid params
        -32601, // method not found
    ];
    if PERMANENT.contains(&code) {
        ErrorClass::Permanent
    } else {
        ErrorClass::Transient
    }
}

/// errno values (Linux), kept here so that this crate does not need libc.
pub mod libc_consts {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EAGAIN: i32 = 11;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const ENODEV: i32 = 19;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const ETIMEDOUT: i32 = 110;
    pub const EALREADY: i32 = 114;
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }
    /// The ceiling of the next delay (without jitter), for tests and logs.
    pub fn ceiling(&self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        exp.min(self.cap)
    }
    /// The next delay: uniform in [0, ceiling], at least 1 ms.
    pub fn next_delay(&mut self) -> Duration {
        let c = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = rand::thread_rng().gen_range(1..=c.as_millis().max(1) as u64);
        Duration::from_millis(ms)
    }
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling());
            let d = b.next_delay();
            assert!(d <= *ceilings.last().unwrap());
        }
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[3], Duration::from_millis(800));
        assert_eq!(*ceilings.last().unwrap(), Duration::from_secs(5));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn classes() {
        assert_eq!(classify_rpc_code(-22), ErrorClass::Permanent);
        assert_eq!(classify_rpc_code(-28), ErrorClass::Permanent);
        assert_eq!(classify_rpc_code(-110), ErrorClass::Transient);
        assert_eq!(classify_rpc_code(-19), ErrorClass::Transient);
    }
}
