//! Resource quantities, parsed the way Kubernetes users write them (`500m`, `2`, `64Mi`, `8Gi`).
//!
//! Hand-written rather than a crate: colony-core stays free of dependencies beyond serde, and the
//! Kubernetes quantity grammar we accept is small and fully tested here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// What a task requests or an executor offers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// Named custom resources (`license=2`), counted in whole units.
    pub custom: BTreeMap<String, u64>,
}

/// One kind of resource, to say which one does not fit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResourceKind {
    Cpu,
    Memory,
    Gpus,
    Custom(String),
}

impl ResourceKind {
    /// An amount of this resource the way a person reads it (`250m`, `64Mi`, `2`).
    pub fn format(&self, amount: u64) -> String {
        match self {
            ResourceKind::Cpu => format_cpu_millis(amount),
            ResourceKind::Memory => format_memory_bytes(amount),
            ResourceKind::Gpus | ResourceKind::Custom(_) => amount.to_string(),
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceKind::Cpu => f.write_str("cpu"),
            ResourceKind::Memory => f.write_str("memory"),
            ResourceKind::Gpus => f.write_str("gpus"),
            ResourceKind::Custom(name) => f.write_str(name),
        }
    }
}

/// A quantity asked for that does not fit in what is available. Displayed as what was asked
/// (`64Gi memory`), the way "no executor has ..." reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub resource: ResourceKind,
    pub requested: u64,
    pub available: u64,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.resource.format(self.requested), self.resource)
    }
}

impl Resources {
    /// True when every quantity here is at most the same quantity in `available`.
    pub fn fits_in(&self, available: &Resources) -> bool {
        self.cpu_millis <= available.cpu_millis
            && self.memory_bytes <= available.memory_bytes
            && self.gpus <= available.gpus
            && self
                .custom
                .iter()
                .all(|(name, &amount)| amount <= available.custom.get(name).copied().unwrap_or(0))
    }

    /// The first quantity that does not fit in `available` (memory, then cpu, gpus, custom), or
    /// None when everything fits.
    pub fn first_shortfall(&self, available: &Resources) -> Option<Shortfall> {
        let short = |resource: ResourceKind, requested: u64, available: u64| {
            (requested > available).then_some(Shortfall { resource, requested, available })
        };
        short(ResourceKind::Memory, self.memory_bytes, available.memory_bytes)
            .or_else(|| short(ResourceKind::Cpu, self.cpu_millis, available.cpu_millis))
            .or_else(|| short(ResourceKind::Gpus, u64::from(self.gpus), u64::from(available.gpus)))
            .or_else(|| {
                self.custom.iter().find_map(|(name, &amount)| {
                    short(
                        ResourceKind::Custom(name.clone()),
                        amount,
                        available.custom.get(name).copied().unwrap_or(0),
                    )
                })
            })
    }

    /// Adds `other` in place, saturating (quantities are validated far below u64::MAX).
    pub fn add(&mut self, other: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.gpus = self.gpus.saturating_add(other.gpus);
        for (name, &amount) in other.custom.iter().filter(|(_, &amount)| amount > 0) {
            let entry = self.custom.entry(name.clone()).or_default();
            *entry = entry.saturating_add(amount);
        }
    }

    /// Subtracts `other` in place; callers only subtract what they added, so nothing goes
    /// below zero, and a custom resource that reaches zero is removed to keep equality exact.
    pub fn sub(&mut self, other: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_sub(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_sub(other.memory_bytes);
        self.gpus = self.gpus.saturating_sub(other.gpus);
        for (name, &amount) in &other.custom {
            if let Some(entry) = self.custom.get_mut(name) {
                *entry = entry.saturating_sub(amount);
                if *entry == 0 {
                    self.custom.remove(name);
                }
            }
        }
    }

    /// `self - used`, never below zero.
    pub fn minus(&self, used: &Resources) -> Resources {
        let mut free = self.clone();
        free.sub(used);
        free
    }
}

/// Why a quantity did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("empty quantity")]
    Empty,
    #[error("quantity {0:?} is negative")]
    Negative(String),
    #[error("quantity {0:?} is not a number with an optional unit (examples: {1})")]
    Malformed(String, &'static str),
    #[error("quantity {0:?} has unknown unit {1:?} (known: {2})")]
    UnknownUnit(String, String, &'static str),
    #[error("quantity {0:?} is too large")]
    Overflow(String),
    #[error("quantity {0:?} is finer than the smallest unit ({1})")]
    TooPrecise(String, &'static str),
}

const CPU_EXAMPLES: &str = "500m, 2, 0.5";
const MEMORY_EXAMPLES: &str = "64Mi, 8Gi, 512M, 1048576";
const MEMORY_UNITS: &str = "Ki Mi Gi Ti Pi Ei k K M G T P E";

/// Splits `"1.5Gi"` into the decimal number (as integer part, fraction digits) and the unit.
fn split_number(
    text: &str,
    examples: &'static str,
) -> Result<(u128, u128, u32, String), QuantityError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(QuantityError::Empty);
    }
    if t.starts_with('-') {
        return Err(QuantityError::Negative(text.to_owned()));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(end);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty())
        || frac_part.contains('.')
        || frac_part.len() > 18
    {
        return Err(QuantityError::Malformed(text.to_owned(), examples));
    }
    let overflow = || QuantityError::Overflow(text.to_owned());
    let int: u128 =
        if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| overflow())? };
    let frac: u128 =
        if frac_part.is_empty() { 0 } else { frac_part.parse().map_err(|_| overflow())? };
    Ok((int, frac, frac_part.len() as u32, unit.to_owned()))
}

/// Multiplies `int.frac` by `multiplier` and requires an exact integer result.
fn scale(
    text: &str,
    int: u128,
    frac: u128,
    frac_digits: u32,
    multiplier: u128,
    finest: &'static str,
) -> Result<u64, QuantityError> {
    let overflow = || QuantityError::Overflow(text.to_owned());
    let denominator = 10u128.pow(frac_digits);
    let whole = int.checked_mul(multiplier).ok_or_else(overflow)?;
    let frac_scaled = frac.checked_mul(multiplier).ok_or_else(overflow)?;
    if frac_scaled % denominator != 0 {
        return Err(QuantityError::TooPrecise(text.to_owned(), finest));
    }
    let total = whole.checked_add(frac_scaled / denominator).ok_or_else(overflow)?;
    u64::try_from(total).map_err(|_| overflow())
}

/// Parses a CPU quantity into millicores: `500m` is 500, `2` is 2000, `0.25` is 250.
pub fn parse_cpu_millis(text: &str) -> Result<u64, QuantityError> {
    let (int, frac, digits, unit) = split_number(text, CPU_EXAMPLES)?;
    let multiplier = match unit.as_str() {
        "" => 1000,
        "m" => 1,
        other => {
            return Err(QuantityError::UnknownUnit(
                text.to_owned(),
                other.to_owned(),
                "m (millicores) or none (cores)",
            ))
        }
    };
    scale(text, int, frac, digits, multiplier, "1m")
}

/// Parses a memory quantity into bytes: `64Mi`, `8Gi`, `512M`, `1.5Gi`, or plain bytes.
pub fn parse_memory_bytes(text: &str) -> Result<u64, QuantityError> {
    let (int, frac, digits, unit) = split_number(text, MEMORY_EXAMPLES)?;
    let multiplier: u128 = match unit.as_str() {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        other => {
            return Err(QuantityError::UnknownUnit(text.to_owned(), other.to_owned(), MEMORY_UNITS))
        }
    };
    scale(text, int, frac, digits, multiplier, "1 byte")
}

/// Formats bytes the short way people read them (`64Mi`, `1.5Gi`, `100`).
pub fn format_memory_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] =
        [("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{}{unit}", bytes / size)
            } else {
                format!("{:.1}{unit}", bytes as f64 / size as f64)
            };
        }
    }
    bytes.to_string()
}

/// Formats millicores as `250m` or `2`.
pub fn format_cpu_millis(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu={} mem={}",
            format_cpu_millis(self.cpu_millis),
            format_memory_bytes(self.memory_bytes)
        )?;
        if self.gpus > 0 {
            write!(f, " gpu={}", self.gpus)?;
        }
        for (name, amount) in &self.custom {
            write!(f, " {name}={amount}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis("0.25"), Ok(250));
        assert_eq!(parse_cpu_millis("1.5"), Ok(1500));
        assert_eq!(parse_cpu_millis(" 250m "), Ok(250));
        assert!(matches!(parse_cpu_millis("-1"), Err(QuantityError::Negative(_))));
        assert!(matches!(parse_cpu_millis("0.0001"), Err(QuantityError::TooPrecise(..))));
        assert!(matches!(parse_cpu_millis("2x"), Err(QuantityError::UnknownUnit(..))));
        assert!(matches!(parse_cpu_millis(""), Err(QuantityError::Empty)));
        assert!(matches!(parse_cpu_millis("abc"), Err(QuantityError::Malformed(..))));
        assert!(matches!(parse_cpu_millis("."), Err(QuantityError::Malformed(..))));
        assert!(matches!(parse_cpu_millis("1.2.3"), Err(QuantityError::Malformed(..))));
        assert!(matches!(
            parse_cpu_millis("99999999999999999999999"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory_bytes("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory_bytes("8Gi"), Ok(8 << 30));
        assert_eq!(parse_memory_bytes("512M"), Ok(512_000_000));
        assert_eq!(parse_memory_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory_bytes("1024"), Ok(1024));
        assert!(matches!(parse_memory_bytes("12Q"), Err(QuantityError::UnknownUnit(..))));
        assert!(matches!(parse_memory_bytes("-5Mi"), Err(QuantityError::Negative(_))));
        assert!(matches!(parse_memory_bytes("0.5"), Err(QuantityError::TooPrecise(..))));
        assert!(matches!(parse_memory_bytes("16Ei"), Err(QuantityError::Overflow(_))));
    }

    #[test]
    fn formatting_round_trips() {
        for bytes in [0u64, 1, 1023, 64 << 20, 8 << 30, 3 << 29] {
            let text = format_memory_bytes(bytes);
            if bytes % (1 << 20) == 0 || bytes < 1024 {
                assert_eq!(parse_memory_bytes(&text), Ok(bytes), "{text}");
            }
        }
        for millis in [0u64, 250, 1000, 2500] {
            assert_eq!(parse_cpu_millis(&format_cpu_millis(millis)), Ok(millis));
        }
    }
}
