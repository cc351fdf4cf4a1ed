//! The last bytes of a child's output stream: a ring of at most `cap` bytes.
//!
//! Owns nothing but its buffer. Never grows past `cap`, whatever the child writes,
//! and allocates nothing until the first byte arrives (a silent child is free).

use std::collections::VecDeque;

/// The newest `cap` bytes pushed, and how many were pushed in all.
#[derive(Debug)]
pub(super) struct Tail {
    cap: usize,
    buf: VecDeque<u8>,
    total: u64,
}

impl Tail {
    pub(super) fn new(cap: usize) -> Tail {
        Tail {
            cap,
            buf: VecDeque::new(),
            total: 0,
        }
    }

    /// Appends `bytes`, dropping the oldest bytes beyond the bound.
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.cap == 0 || bytes.is_empty() {
            return;
        }
        if self.buf.capacity() < self.cap {
            self.buf.reserve_exact(self.cap - self.buf.len());
        }
        let keep = &bytes[bytes.len().saturating_sub(self.cap)..];
        let over = (self.buf.len() + keep.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(keep);
    }

    /// Bytes pushed in all, kept or not.
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    /// The kept bytes, oldest first.
    pub(super) fn into_vec(self) -> Vec<u8> {
        Vec::from(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small pushes are kept whole until the bound, then the oldest bytes go first.
    #[test]
    fn keeps_the_newest_bytes() {
        let mut t = Tail::new(5);
        t.push(b"abc");
        t.push(b"def");
        t.push(b"g");
        assert_eq!(t.total(), 7);
        assert_eq!(t.into_vec(), b"cdefg");
    }

    /// One push larger than the bound keeps only its own last `cap` bytes.
    #[test]
    fn large_push_keeps_its_end() {
        let mut t = Tail::new(4);
        t.push(b"xy");
        t.push(b"0123456789");
        assert_eq!(t.buf.capacity(), 4);
        assert_eq!(t.into_vec(), b"6789");
    }

    /// A zero bound keeps nothing and allocates nothing, but still counts.
    #[test]
    fn zero_cap_only_counts() {
        let mut t = Tail::new(0);
        t.push(b"hello");
        assert_eq!(t.buf.capacity(), 0);
        assert_eq!(t.total(), 5);
        assert!(t.into_vec().is_empty());
    }
}
