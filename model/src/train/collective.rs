//! Data parallelism: the peers of a run sum their gradients before every optimiser step.
//!
//! [`Collective`] is the small interface the trainers see — a rank, a world size and an
//! element-wise sum of one buffer across all peers. The engine behind it is burn 0.21's
//! `burn-collective` ([`BurnPeer`]: threads of one process as peers, one per device; NCCL
//! between CUDA devices), kept behind our trait because burn replaces it after 0.21.
//! [`Solo`] is the one-peer group every single-device run uses (no copies, no reduction).
//!
//! [`all_reduce_step`] is what a trainer calls once per optimiser step: the gradients of the
//! trainable parameters, in module-traversal order (burn's `ParamId`s are random per process,
//! so they cannot order anything shared), go into one fused buffer together with the step's
//! scalars (loss, token counts) and a failure flag, and come back summed. A peer that failed
//! locally (a bad batch, a non-finite loss) still takes part with its flag set, so every peer
//! learns of the failure from the same reduction instead of waiting for a peer that left.
//!
//! [`check_in_sync`] compares a checksum of the weights across peers: identical weights and
//! identical summed gradients keep them identical, and a drift is a bug to stop on.

use std::sync::Mutex;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData, TensorPrimitive};

use crate::error::{ModelError, Result};

/// A group of peers that sum buffers. Every peer calls the same operations in the same order.
pub trait Collective<B: Backend>: Send {
    /// This peer's index, `0..world_size()`; rank 0 writes checkpoints and reports progress.
    fn rank(&self) -> usize;
    /// Number of peers.
    fn world_size(&self) -> usize;
    /// The element-wise sum of `buffer` over all peers; every peer receives the same result.
    fn all_reduce_sum(&mut self, buffer: Tensor<B, 1>) -> Result<Tensor<B, 1>>;
}

/// The group of one: a run on a single device.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl<B: Backend> Collective<B> for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, buffer: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(buffer)
    }
}

/// One peer of an in-process group on burn-collective's local server (see [`run_in_process`]).
pub struct BurnPeer<B: Backend> {
    id: burn_collective::PeerId,
    rank: usize,
    world: usize,
    _backend: std::marker::PhantomData<fn() -> B>,
}

impl<B: Backend> Collective<B> for BurnPeer<B> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buffer: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let primitive = buffer.into_primitive().tensor();
        let summed = burn_collective::all_reduce::<B>(self.id, primitive, burn_collective::ReduceOperation::Sum)
            .map_err(|e| ModelError::Device(format!("all-reduce on peer {}: {e:?}", self.rank)))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)))
    }
}

impl<B: Backend> Drop for BurnPeer<B> {
    fn drop(&mut self) {
        // Unregisters the peer; the last one out closes the session. Errors only mean the
        // server is already gone.
        let _ = burn_collective::finish_collective::<B>(self.id);
    }
}

/// burn-collective keeps one local server per backend type per process: two groups of the
/// same backend at once would mix their peers, so groups take turns.
static LOCAL_GROUP: Mutex<()> = Mutex::new(());

/// Runs `work(rank, device, peer)` once per device on its own thread, each with a
/// [`BurnPeer`] of one group, and returns the results in rank order. Any peer's error is the
/// group's error (the lowest rank's is returned); a panicking peer is reported as an error,
/// not propagated.
pub fn run_in_process<B, T, E, F>(devices: &[B::Device], work: F) -> std::result::Result<Vec<T>, E>
where
    B: Backend,
    T: Send,
    E: From<ModelError> + Send,
    F: Fn(usize, &B::Device, &mut dyn Collective<B>) -> std::result::Result<T, E> + Sync,
{
    if devices.is_empty() {
        return Err(ModelError::Device("a data-parallel group needs at least one device".into()).into());
    }
    let _turn = LOCAL_GROUP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    burn_collective::reset_collective::<B>();
    let world = devices.len();
    let config = burn_collective::CollectiveConfig::default().with_num_devices(world);
    let outcomes: Vec<std::result::Result<T, E>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                let (config, work) = (config.clone(), &work);
                scope.spawn(move || -> std::result::Result<T, E> {
                    let id = burn_collective::PeerId::from(rank);
                    burn_collective::register::<B>(id, device.clone(), config)
                        .map_err(|e| ModelError::Device(format!("registering peer {rank}: {e:?}")))?;
                    let mut peer = BurnPeer::<B> { id, rank, world, _backend: std::marker::PhantomData };
                    work(rank, device, &mut peer)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| h.join().unwrap_or_else(|_| Err(ModelError::Device(format!("peer {rank} panicked")).into())))
            .collect()
    });
    burn_collective::reset_collective::<B>();
    outcomes.into_iter().collect()
}

/// The step's scalars that are summed across peers beside the gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTotals {
    /// Sum of the peers' loss contributions (each already divided by the global normaliser).
    pub loss: f64,
    /// Real input tokens.
    pub tokens: f64,
}

/// Sums `grads` (the trainable parameters of `model`), `totals` and the failure flags across
/// the peers of `collective`; with one peer it returns them untouched. A peer whose step
/// failed locally passes `local_failed` (and empty gradients) and keeps its own error; every
/// other peer gets an error naming the failed ranks, so none waits for a peer that left.
pub fn all_reduce_step<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: GradientsParams,
    totals: StepTotals,
    local_failed: bool,
    collective: &mut dyn Collective<B::InnerBackend>,
) -> Result<(GradientsParams, StepTotals)> {
    let world = collective.world_size();
    if world == 1 {
        return Ok((grads, totals));
    }
    let rank = collective.rank();
    let mut gather = Gather::<B> { grads: &grads, pieces: Vec::new(), present: Vec::new(), sizes: Vec::new(), device: None };
    model.visit(&mut gather);
    let Gather { pieces, present, sizes, device, .. } = gather;
    drop(grads);
    let Some(device) = device else {
        return Err(ModelError::Input("the model has no trainable parameters to synchronise".into()));
    };
    // Layout: [gradients..., present flags (one per parameter)..., loss, tokens, failed (one slot per rank)].
    let params = sizes.len();
    let mut tail = present;
    tail.push(totals.loss as f32);
    tail.push(totals.tokens as f32);
    let mut failed = vec![0.0f32; world];
    if local_failed {
        failed[rank] = 1.0;
    }
    tail.extend_from_slice(&failed);
    let mut pieces = pieces;
    pieces.push(Tensor::from_data(TensorData::new(tail.clone(), [tail.len()]), &device));
    let summed = collective.all_reduce_sum(Tensor::cat(pieces, 0))?;
    let grad_len: usize = sizes.iter().sum();
    let tail_sum: Vec<f32> = summed
        .clone()
        .slice(grad_len..grad_len + tail.len())
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("reading the reduced step totals: {e:?}")))?;
    let failed_ranks: Vec<usize> = (0..world).filter(|&r| tail_sum[params + 2 + r] != 0.0).collect();
    if !failed_ranks.is_empty() {
        return Err(ModelError::Device(format!("peer(s) {failed_ranks:?} failed this step; stopping every peer")));
    }
    let mut scatter = Scatter::<B> { summed, present: &tail_sum[..params], index: 0, offset: 0, out: GradientsParams::new() };
    model.visit(&mut scatter);
    let out = scatter.out;
    let totals = StepTotals { loss: f64::from(tail_sum[params]), tokens: f64::from(tail_sum[params + 1]) };
    Ok((out, totals))
}

/// Sums a scalar across peers (e.g. the step's target-token count, the loss normaliser).
pub fn all_reduce_scalar<B: Backend>(value: f64, device: &B::Device, collective: &mut dyn Collective<B>) -> Result<f64> {
    if collective.world_size() == 1 {
        return Ok(value);
    }
    let t = Tensor::<B, 1>::from_data(TensorData::new(vec![value as f32], [1]), device);
    Ok(collective.all_reduce_sum(t)?.into_scalar().elem::<f64>())
}

/// The global gradient norm every peer clips by: rank 0's measurement of the summed
/// gradients, sent to all. Each peer measuring its own copy is not enough: the backend's
/// parallel sums can round differently from one run to the next, and a last-bit difference in
/// the clip scale makes the peers' weights drift apart.
pub fn agreed_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
    collective: &mut dyn Collective<B::InnerBackend>,
) -> Result<f64> {
    let norm = super::adamw::AdamW::<B>::grad_norm(model, grads);
    let world = collective.world_size();
    if world == 1 {
        return Ok(norm);
    }
    let mut device = None;
    model.visit(&mut FirstDevice::<B> { device: &mut device });
    let Some(device) = device else { return Ok(norm) };
    // f64 as two f32 (high part, rounding rest), from rank 0 only.
    let mut slots = [0.0f32; 2];
    if collective.rank() == 0 {
        slots[0] = norm as f32;
        slots[1] = (norm - f64::from(slots[0])) as f32;
    }
    let agreed = collective
        .all_reduce_sum(Tensor::from_data(TensorData::new(slots.to_vec(), [2]), &device))?
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("reading the agreed gradient norm: {e:?}")))?;
    Ok(f64::from(agreed[0]) + f64::from(agreed[1]))
}

struct FirstDevice<'a, B: AutodiffBackend> {
    device: &'a mut Option<InnerDevice<B>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for FirstDevice<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.device.is_none() {
            *self.device = Some(param.val().inner().device());
        }
    }
}

/// Compares a checksum of `model`'s trainable weights across peers and fails, naming the
/// ranks, when any differs from rank 0's.
pub fn check_in_sync<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    collective: &mut dyn Collective<B::InnerBackend>,
) -> Result<()> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(());
    }
    let mut sum = Checksum::<B> { total: 0.0, device: None };
    model.visit(&mut sum);
    let Some(device) = sum.device else { return Ok(()) };
    // f64 sent as two f32 (high part, rounding rest), compared bit for bit.
    let hi = sum.total as f32;
    let lo = (sum.total - f64::from(hi)) as f32;
    let mut slots = vec![0.0f32; 2 * world];
    slots[2 * collective.rank()] = hi;
    slots[2 * collective.rank() + 1] = lo;
    let all = collective
        .all_reduce_sum(Tensor::from_data(TensorData::new(slots, [2 * world]), &device))?
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("reading the weight checksums: {e:?}")))?;
    let value = |r: usize| f64::from(all[2 * r]) + f64::from(all[2 * r + 1]);
    let drifted: Vec<usize> = (1..world).filter(|&r| value(r).to_bits() != value(0).to_bits()).collect();
    let all: Vec<f64> = (0..world).map(value).collect();
    if drifted.is_empty() {
        Ok(())
    } else {
        Err(ModelError::Device(format!(
            "the weights of peer(s) {drifted:?} drifted from peer 0's (checksums {all:?}); the peers no longer train one model"
        )))
    }
}

/// Collects the trainable parameters' gradients, flattened, in traversal order.
struct Gather<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    pieces: Vec<Tensor<B::InnerBackend, 1>>,
    /// 1 where this peer has a gradient for the parameter (a frozen or unused one has none).
    present: Vec<f32>,
    sizes: Vec<usize>,
    device: Option<InnerDevice<B>>,
}

type InnerDevice<B> = <<B as AutodiffBackend>::InnerBackend as burn::tensor::backend::BackendTypes>::Device;

impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let size = value.shape().num_elements();
        let device = value.inner().device();
        let (flat, present) = match self.grads.get::<B::InnerBackend, D>(param.id) {
            Some(g) => (g.reshape([size as i32]), 1.0),
            None => (Tensor::zeros([size], &device), 0.0),
        };
        self.pieces.push(flat);
        self.present.push(present);
        self.sizes.push(size);
        self.device.get_or_insert(device);
    }
}

/// Puts the summed gradients back, in the order [`Gather`] took them, keyed by this peer's
/// own parameter ids; a parameter no peer had a gradient for stays without one.
struct Scatter<'a, B: AutodiffBackend> {
    summed: Tensor<B::InnerBackend, 1>,
    present: &'a [f32],
    index: usize,
    offset: usize,
    out: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scatter<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let size = value.shape().num_elements();
        if self.present.get(self.index).is_some_and(|&p| p > 0.0) {
            let dims: [usize; D] = value.shape().dims();
            let flat = self.summed.clone().slice(self.offset..self.offset + size);
            self.out.register::<B::InnerBackend, D>(param.id, flat.reshape(dims));
        }
        self.index += 1;
        self.offset += size;
    }
}

struct Checksum<B: AutodiffBackend> {
    total: f64,
    device: Option<InnerDevice<B>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Checksum<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let inner = value.inner();
        self.device.get_or_insert(inner.device());
        // Summed on the host in order: the backend's parallel sums may round differently on
        // two peers holding the same weights. Sum plus sum of squares: an update applied on
        // one peer only moves it.
        if let Ok(values) = inner.into_data().convert::<f32>().to_vec::<f32>() {
            self.total += values.iter().map(|&x| f64::from(x) + f64::from(x) * f64::from(x)).sum::<f64>();
        }
    }
}
