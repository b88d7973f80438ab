//! Writes into the KV cache's blocks in place. burn's `slice_assign` and `select` return new
//! tensors, so a decode step that appended its one position by concatenation copied the open
//! block of every layer, and every sequence leaving a running batch copied the whole cache
//! (and faulted in fresh pages for it). A block the cache alone holds is written through its
//! Flex storage instead; anything else (another backend, a block shared with a clone of the
//! cache) is handed back for the caller's copying path.

use std::any::{Any, TypeId};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use super::{flex, View};

/// Whether blocks of `B` are written in place here (and so are worth allocating with room):
/// the plain CPU backend where the kernels run.
pub(crate) fn writes_in_place<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<crate::CpuBackend>() && super::available()
}

/// Runs `edit` on the Flex tensor behind `t` (`None`: `B` is another backend) and hands the
/// tensor back, edited or not.
fn edit_flex<B: Backend, R>(t: Tensor<B, 4>, edit: impl FnOnce(&mut FlexTensor) -> Option<R>) -> (Tensor<B, 4>, Option<R>) {
    let mut primitive = t.into_primitive().tensor();
    let done = if writes_in_place::<B>() { (&mut primitive as &mut dyn Any).downcast_mut::<FlexTensor>().and_then(edit) } else { None };
    (Tensor::from_primitive(TensorPrimitive::Float(primitive)), done)
}

fn done_or_back<B: Backend>((t, done): (Tensor<B, 4>, Option<()>)) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    match done {
        Some(()) => Ok(t),
        None => Err(t),
    }
}

/// `[d0, d1, d2, d3]` strides of an f32 block whose last dimension is contiguous.
fn row_strides(f: &FlexTensor) -> Option<[usize; 3]> {
    let s = f.layout().strides();
    (f.dtype() == DType::F32 && s.len() == 4 && s[3] == 1 && s[..3].iter().all(|&v| v >= 0)).then(|| [s[0] as usize, s[1] as usize, s[2] as usize])
}

/// Writes `new` (`[b, kv, s, d]`) over positions `at..at + s` of `block` (`[b, kv, cap, d]`)
/// in place. `Err(block)`, untouched, where that cannot be done: another backend, a block
/// whose storage is shared, shapes that do not fit.
pub(crate) fn write_positions<B: Backend>(block: Tensor<B, 4>, at: usize, new: &Tensor<B, 4>) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, kv, cap, d] = block.dims();
    let [nb, nkv, s, nd] = new.dims();
    if [nb, nkv, nd] != [b, kv, d] || at + s > cap || b * kv * s * d == 0 {
        return Err(block);
    }
    let Some(src) = flex(new) else { return Err(block) };
    let Some(src_view) = View::of(&src) else { return Err(block) };
    done_or_back(edit_flex(block, |f| {
        let strides = row_strides(f)?;
        let start = f.layout().start_offset();
        let dst = f.try_storage_mut::<f32>()?;
        // Every row written must lie inside the storage (checked before any write).
        let last = start + strides[0] * (b - 1) + strides[1] * (kv - 1) + strides[2] * (at + s - 1) + d;
        if last > dst.len() {
            return None;
        }
        for bi in 0..b {
            for g in 0..kv {
                for p in 0..s {
                    let to = start + bi * strides[0] + g * strides[1] + (at + p) * strides[2];
                    dst[to..to + d].copy_from_slice(src_view.row(bi, g, p));
                }
            }
        }
        Some(())
    }))
}

/// `block` (`[b, …]`) with only the sequences `keep` (strictly ascending), moved down in place:
/// the same values as `select(0, keep)` without a new buffer. `Err(block)`, untouched, where
/// that cannot be done (another backend, shared storage, a layout whose sequences are not
/// each one contiguous run).
pub(crate) fn keep_sequences<B: Backend>(block: Tensor<B, 4>, keep: &[usize]) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, kv, n, d] = block.dims();
    if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) || keep.iter().any(|&r| r >= b) {
        return Err(block);
    }
    done_or_back(edit_flex(block, |f| {
        // Each sequence must be one contiguous run of `span` floats (its positions and any
        // room after them), `span` apart.
        let strides = row_strides(f)?;
        let span = strides[0];
        if strides[2] != d || strides[1] < n * d || span != kv * strides[1] {
            return None;
        }
        let start = f.layout().start_offset();
        let data = f.try_storage_mut::<f32>()?;
        if start + b * span > data.len() {
            return None;
        }
        for (to, &from) in keep.iter().enumerate() {
            if to != from {
                data.copy_within(start + from * span..start + (from + 1) * span, start + to * span);
            }
        }
        // The view of the first `keep.len()` sequences replaces the tensor, whose drop leaves
        // the view the storage's only owner again (later steps write into it in place).
        *f = f.narrow(0, 0, keep.len());
        Some(())
    }))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, TensorData};

    use super::*;
    use crate::CpuBackend as B;

    fn counting(shape: [usize; 4]) -> Tensor<B, 4> {
        let n: usize = shape.iter().product();
        Tensor::from_data(TensorData::new((0..n).map(|i| i as f32).collect::<Vec<_>>(), shape), &Default::default())
    }

    fn values(t: &Tensor<B, 4>) -> Vec<f32> {
        t.to_data().to_vec::<f32>().unwrap()
    }

    fn storage_ptr(t: &Tensor<B, 4>) -> usize {
        flex(t).map_or(0, |f| f.bytes().as_ptr() as usize)
    }

    #[test]
    fn writes_land_in_place_and_equal_slice_assign() {
        if !super::super::available() {
            return;
        }
        let block = counting([2, 3, 8, 4]);
        let new = counting([2, 3, 2, 4]) * -1.0;
        let expected = block.clone().slice_assign([0..2, 0..3, 5..7, 0..4], new.clone());
        let before = storage_ptr(&block);
        let written = write_positions(block, 5, &new).unwrap_or_else(|_| panic!("a lone block is written in place"));
        assert_eq!(storage_ptr(&written), before, "the block's own storage was written");
        assert_eq!(values(&written), values(&expected));
        // A strided source (a swapped view, as a prefill's keys are) reads the same values.
        let swapped = new.clone().swap_dims(1, 2).swap_dims(1, 2);
        let again = write_positions(written, 5, &swapped).unwrap_or_else(|_| panic!("still alone"));
        assert_eq!(values(&again), values(&expected));
    }

    #[test]
    fn shared_or_misfitting_blocks_come_back_untouched() {
        let block = counting([1, 2, 4, 4]);
        let clone = block.clone();
        let new = counting([1, 2, 1, 4]) + 100.0;
        let back = write_positions(block, 3, &new).map(|_| ()).expect_err("a shared block is not written");
        assert_eq!(values(&back), values(&clone), "nothing was written");
        drop(clone);
        let back = write_positions(back, 4, &new).map(|_| ()).expect_err("position 4 is past the block's room");
        let wrong = counting([1, 1, 1, 4]);
        write_positions(back, 0, &wrong).map(|_| ()).expect_err("another KV head count");
    }

    #[test]
    fn kept_sequences_equal_select_and_keep_the_storage() {
        if !super::super::available() {
            return;
        }
        let block = counting([5, 2, 3, 4]);
        for keep in [vec![0usize, 2, 3], vec![4], vec![1, 2, 3, 4], vec![0, 1, 2, 3, 4]] {
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(keep.iter().map(|&r| r as i64).collect::<Vec<_>>(), [keep.len()]), &Default::default());
            let expected = block.clone().select(0, idx);
            let own = counting([5, 2, 3, 4]);
            let before = storage_ptr(&own);
            let kept = keep_sequences(own, &keep).unwrap_or_else(|_| panic!("a lone block is moved in place"));
            assert_eq!(storage_ptr(&kept), before);
            assert_eq!(kept.dims(), expected.dims());
            assert_eq!(values(&kept), values(&expected), "keep {keep:?}");
            // The kept view is the storage's only owner: the next step writes into it.
            let new = counting([keep.len(), 2, 1, 4]);
            assert!(write_positions(kept, 2, &new).is_ok());
        }
        for bad in [vec![], vec![2, 1], vec![1, 1], vec![5]] {
            keep_sequences(counting([5, 2, 3, 4]), &bad).map(|_| ()).expect_err("not a strictly ascending set of rows");
        }
    }
}
