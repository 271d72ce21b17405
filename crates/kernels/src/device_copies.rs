//! Values derived from something that does not change, made once per device and kept beside it.
//!
//! A batch's packed sequences are fixed once built, but every attention layer of a forward pass
//! (and the backward pass, which attends again) needs the same device tensors derived from them:
//! the row offsets and key bias, the dense padding bias, the index maps of each chunk. Made on
//! every call, each is a host→device copy per layer (and on a GPU a copy from pageable memory
//! that the host waits for). [`DeviceCopies`] keeps them, keyed by a name and the device, for as
//! long as the value they came from lives: the owner holds one and hands it out
//! ([`crate::cpu::packed_attention::SequenceLayout::device_copies`]).
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_kernels::device_copies::DeviceCopies;
//! use rankstack_kernels::host_transfer::{record_transfers, upload, Origin};
//! let copies = DeviceCopies::default();
//! let dev = Device::Cpu;
//! let make = || upload(vec![0u32, 3, 5], 3, &dev, "offsets", Origin::Input);
//! let (first, transfers) = record_transfers(|| copies.get_or_make("offsets", &dev, make));
//! let (again, none) = record_transfers(|| copies.get_or_make("offsets", &dev, make));
//! assert_eq!((transfers.len(), none.len()), (1, 0)); // uploaded once
//! assert_eq!(first?.to_vec1::<u32>()?, again?.to_vec1::<u32>()?);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::any::Any;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Result};

/// Device values derived from an immutable owner, one per (name, device). Cloning copies the
/// handles (the values are shared: they describe the same owner). Two of them always compare
/// equal, so that an owner's derived `PartialEq` compares what it holds, not what it has cached.
#[derive(Default)]
pub struct DeviceCopies {
    entries: Mutex<Vec<Entry>>,
}

#[derive(Clone)]
struct Entry {
    what: String,
    device: Device,
    value: Arc<dyn Any + Send + Sync>,
}

impl DeviceCopies {
    /// The value named `what` on `device`: the one kept, or `make()`'s (then kept). `make` runs
    /// without the cache's lock held (it may use the cache itself); two threads making the same
    /// value at once both run it, and the first one kept wins. A name asked for with another type
    /// than it was kept as is an error.
    pub fn get_or_make<T: Clone + Send + Sync + 'static>(
        &self,
        what: &str,
        device: &Device,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if let Some(kept) = self.find::<T>(what, device)? {
            return Ok(kept);
        }
        let made = make()?;
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(kept) = entries.iter().find(|e| e.what == what && e.device.same_device(device)) {
            return downcast(kept, what);
        }
        entries.push(Entry { what: what.to_string(), device: device.clone(), value: Arc::new(made.clone()) });
        Ok(made)
    }

    /// How many values are kept.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn find<T: Clone + 'static>(&self, what: &str, device: &Device) -> Result<Option<T>> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.iter().find(|e| e.what == what && e.device.same_device(device)).map(|e| downcast(e, what)).transpose()
    }
}

fn downcast<T: Clone + 'static>(entry: &Entry, what: &str) -> Result<T> {
    match entry.value.downcast_ref::<T>() {
        Some(value) => Ok(value.clone()),
        None => {
            candle_core::bail!("device copies: `{what}` is kept as another type than {}", std::any::type_name::<T>())
        }
    }
}

impl Clone for DeviceCopies {
    fn clone(&self) -> Self {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        Self { entries: Mutex::new(entries) }
    }
}

impl PartialEq for DeviceCopies {
    /// Always equal: what is cached says nothing the owner's own values do not.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for DeviceCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f.debug_list().entries(entries.iter().map(|e| (&e.what, e.device.location()))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_value_per_name_and_device_and_refuses_another_type() {
        let copies = DeviceCopies::default();
        let cpu = Device::Cpu;
        let mut made = 0;
        for _ in 0..3 {
            let v: Vec<u32> = copies
                .get_or_make("a", &cpu, || {
                    made += 1;
                    Ok(vec![1, 2])
                })
                .unwrap();
            assert_eq!(v, [1, 2]);
        }
        assert_eq!(made, 1);
        assert_eq!(copies.get_or_make("b", &cpu, || Ok(7u8)).unwrap(), 7);
        assert_eq!(copies.len(), 2);
        let err = copies.get_or_make("a", &cpu, || Ok(1.5f32)).unwrap_err().to_string();
        assert!(err.contains("`a` is kept as another type than f32"), "{err}");
        // A failed make keeps nothing.
        assert!(copies.get_or_make::<u8>("c", &cpu, || candle_core::bail!("no")).is_err());
        assert_eq!(copies.len(), 2);
        // Clones share the values; any two compare equal.
        let clone = copies.clone();
        assert_eq!(clone.get_or_make("b", &cpu, || Ok(9u8)).unwrap(), 7);
        assert_eq!(DeviceCopies::default(), copies);
        assert_eq!(format!("{copies:?}"), r#"[("a", Cpu), ("b", Cpu)]"#);
    }

    #[test]
    fn make_may_use_the_cache_itself() {
        let copies = DeviceCopies::default();
        let cpu = Device::Cpu;
        let outer =
            copies.get_or_make("outer", &cpu, || Ok(copies.get_or_make("inner", &cpu, || Ok(2u32))? + 1)).unwrap();
        assert_eq!((outer, copies.len()), (3, 2));
    }
}
