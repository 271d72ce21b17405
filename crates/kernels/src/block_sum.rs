//! What the CPU mirrors of the CUDA kernels' block reductions share.

/// The sum of `sums` (one value per thread of a CUDA block, a power of two of them) as the block
/// adds them: pairwise, halving (`sums[t] += sums[t + s]` for `s` = n/2, …, 1), so that the
/// mirror has the kernel's bits. Overwrites `sums`; 0 for none.
pub(crate) fn pairwise_block_sum<T: Copy + Default + std::ops::AddAssign>(sums: &mut [T]) -> T {
    debug_assert!(sums.len() <= 1 || sums.len().is_power_of_two(), "a block of {} threads", sums.len());
    let mut s = sums.len() / 2;
    while s > 0 {
        for t in 0..s {
            let other = sums[t + s];
            sums[t] += other;
        }
        s /= 2;
    }
    sums.first().copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_pairwise_in_halves() {
        // (a0 + a2) + (a1 + a3) = 0 here, where ((a0 + a1) + a2) + a3 = 2.
        let mut sums = [1e16f64, -1e16, 1.0, 1.0];
        assert_eq!(pairwise_block_sum(&mut sums), (1e16 + 1.0) + (-1e16 + 1.0));
        assert_eq!(pairwise_block_sum::<f32>(&mut []), 0.0);
        assert_eq!(pairwise_block_sum(&mut [3f32]), 3.0);
    }
}
