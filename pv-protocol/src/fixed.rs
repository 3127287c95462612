//! A fixed-capacity, allocation-free list used by checked wire types.

use core::fmt;
use core::ops::Deref;

/// Up to `N` values of `T` stored inline; `len <= N` always holds.
#[derive(Clone, Copy)]
pub struct FixedVec<T: Copy + Default, const N: usize> {
    items: [T; N],
    len: usize,
}

impl<T: Copy + Default, const N: usize> FixedVec<T, N> {
    /// Maximum number of elements.
    pub const CAPACITY: usize = N;

    /// An empty list.
    pub fn new() -> Self {
        FixedVec {
            items: [T::default(); N],
            len: 0,
        }
    }

    /// Copies `items`; `None` when there are more than `N`.
    pub fn from_slice(items: &[T]) -> Option<Self> {
        let mut v = Self::new();
        v.items.get_mut(..items.len())?.copy_from_slice(items);
        v.len = items.len();
        Some(v)
    }

    /// Appends `item`; gives it back when full.
    pub fn try_push(&mut self, item: T) -> Result<(), T> {
        match self.items.get_mut(self.len) {
            Some(slot) => {
                *slot = item;
                self.len += 1;
                Ok(())
            }
            None => Err(item),
        }
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        self.items.get(..self.len).unwrap_or(&[])
    }
}

impl<T: Copy + Default, const N: usize> Default for FixedVec<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Default, const N: usize> Deref for FixedVec<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Copy + Default + PartialEq, const N: usize> PartialEq for FixedVec<T, N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Default + Eq, const N: usize> Eq for FixedVec<T, N> {}

impl<T: Copy + Default + fmt::Debug, const N: usize> fmt::Debug for FixedVec<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_beyond_capacity_is_refused() {
        let mut v = FixedVec::<u8, 2>::new();
        assert_eq!(v.try_push(1), Ok(()));
        assert_eq!(v.try_push(2), Ok(()));
        assert_eq!(v.try_push(3), Err(3));
        assert_eq!(v.as_slice(), &[1, 2]);
    }

    #[test]
    fn from_slice_too_long_is_none_and_equality_ignores_unused_slots() {
        assert!(FixedVec::<u8, 2>::from_slice(&[1, 2, 3]).is_none());
        let mut a = FixedVec::<u8, 3>::from_slice(&[1, 2, 3]).unwrap();
        a.len = 1;
        assert_eq!(a, FixedVec::<u8, 3>::from_slice(&[1]).unwrap());
    }
}
