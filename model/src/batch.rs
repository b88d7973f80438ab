//! Host-side input preparation: padding, real-token masks, positions and attention masks.
//! Built on the host so ids are validated before any tensor exists.

use crate::error::{ModelError, Result};

/// Which side padding goes: right for training, left for generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Left,
    Right,
}

/// Token sequences padded to one length, with the mask of real (non-pad) tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// `[batch * seq]`, row-major.
    pub ids: Vec<u32>,
    /// `[batch * seq]`, `true` for real tokens.
    pub mask: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
    /// `[batch * seq]` segment index of each position when several examples are packed into
    /// one row: positions restart at each segment and attention never crosses segments.
    pub segments: Option<Vec<u32>>,
}

impl TokenBatch {
    /// Pads `sequences` to the longest with `pad_id`. Empty batches and empty sequences are errors.
    pub fn new(sequences: &[Vec<u32>], padding: Padding, pad_id: u32) -> Result<Self> {
        if sequences.is_empty() {
            return Err(ModelError::Input("empty batch".into()));
        }
        if let Some(i) = sequences.iter().position(Vec::is_empty) {
            return Err(ModelError::Input(format!("sequence {i} has no tokens")));
        }
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * seq);
        let mut mask = Vec::with_capacity(sequences.len() * seq);
        for s in sequences {
            let pad = seq - s.len();
            let pads = std::iter::repeat_n((pad_id, false), pad);
            let real = s.iter().map(|&t| (t, true));
            let row: Vec<(u32, bool)> = match padding {
                Padding::Left => pads.chain(real).collect(),
                Padding::Right => real.chain(pads).collect(),
            };
            for (t, m) in row {
                ids.push(t);
                mask.push(m);
            }
        }
        Ok(Self {
            ids,
            mask,
            batch: sequences.len(),
            seq,
            segments: None,
        })
    }

    /// Packs several sequences into each row (right-padded): `rows[r]` lists the sequences of
    /// row `r`. Each keeps its own positions from 0 and attends only to itself, so its logits
    /// equal those of an unpacked forward.
    pub fn packed(rows: &[Vec<Vec<u32>>], pad_id: u32) -> Result<Self> {
        if rows.is_empty() {
            return Err(ModelError::Input("empty batch".into()));
        }
        for (r, row) in rows.iter().enumerate() {
            if row.is_empty() || row.iter().any(Vec::is_empty) {
                return Err(ModelError::Input(format!("packed row {r} has an empty sequence")));
            }
        }
        let seq = rows.iter().map(|r| r.iter().map(Vec::len).sum::<usize>()).max().unwrap_or(0);
        let n = rows.len() * seq;
        let (mut ids, mut mask, mut segments) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for row in rows {
            let mut used = 0;
            for (si, s) in row.iter().enumerate() {
                ids.extend_from_slice(s);
                mask.extend(std::iter::repeat_n(true, s.len()));
                segments.extend(std::iter::repeat_n(si as u32, s.len()));
                used += s.len();
            }
            // Pads get a segment of their own, so no real token attends to them.
            ids.extend(std::iter::repeat_n(pad_id, seq - used));
            mask.extend(std::iter::repeat_n(false, seq - used));
            segments.extend(std::iter::repeat_n(row.len() as u32, seq - used));
        }
        Ok(Self {
            ids,
            mask,
            batch: rows.len(),
            seq,
            segments: Some(segments),
        })
    }

    /// One new token per sequence (a decoding step); `None` feeds a masked pad for a
    /// sequence that has finished.
    pub fn step(tokens: &[Option<u32>], pad_id: u32) -> Result<Self> {
        if tokens.is_empty() {
            return Err(ModelError::Input("empty batch".into()));
        }
        Ok(Self {
            ids: tokens.iter().map(|t| t.unwrap_or(pad_id)).collect(),
            mask: tokens.iter().map(Option::is_some).collect(),
            batch: tokens.len(),
            seq: 1,
            segments: None,
        })
    }

    /// Checks the shape invariants (the fields are public, so a batch may be built by hand).
    pub fn validate(&self) -> Result<()> {
        let n = self.batch.saturating_mul(self.seq);
        if self.batch == 0 || self.seq == 0 || self.ids.len() != n || self.mask.len() != n {
            return Err(ModelError::Input(format!(
                "inconsistent batch: {} × {} positions but {} ids and {} mask entries",
                self.batch,
                self.seq,
                self.ids.len(),
                self.mask.len()
            )));
        }
        if let Some(seg) = &self.segments {
            if seg.len() != n {
                return Err(ModelError::Input(format!(
                    "inconsistent batch: {n} positions but {} segment entries",
                    seg.len()
                )));
            }
        }
        Ok(())
    }

    /// Number of real tokens in each sequence.
    pub fn lengths(&self) -> Vec<usize> {
        self.mask
            .chunks(self.seq)
            .map(|row| row.iter().filter(|&&m| m).count())
            .collect()
    }
}

/// Positions and the attention mask of one forward call, given what is already cached.
pub(crate) struct AttentionPlan {
    /// `[batch * seq]` RoPE positions.
    pub positions: Vec<f32>,
    /// `[batch * seq * (past + seq)]`, `true` where attention is blocked; `None` when plain
    /// causal attention is exact (no pad key precedes a real query).
    pub blocked: Option<Vec<bool>>,
    pub keys: usize,
}

/// `past_valid[b]` marks which cached keys of sequence `b` are real; `next_pos[b]` is the
/// position of its next real token. A query sees earlier real keys and always itself, so a
/// pad row never has an empty softmax.
pub(crate) fn plan(batch: &TokenBatch, past_valid: &[Vec<bool>], next_pos: &[usize]) -> AttentionPlan {
    let (b, s) = (batch.batch, batch.seq);
    let past = past_valid.first().map_or(0, Vec::len);
    let keys = past + s;
    let mut positions = Vec::with_capacity(b * s);
    let mut blocked = Vec::with_capacity(b * s * keys);
    let no_past: &[bool] = &[];
    for (bi, row) in batch.mask.chunks(s).enumerate() {
        let cached = past_valid.get(bi).map_or(no_past, Vec::as_slice);
        let seg = batch.segments.as_ref().map(|v| &v[bi * s..(bi + 1) * s]);
        let mut pos = next_pos.get(bi).copied().unwrap_or(0);
        for (i, &real) in row.iter().enumerate() {
            if let Some(seg) = seg {
                if i > 0 && seg[i] != seg[i - 1] {
                    pos = 0;
                }
            }
            positions.push(pos as f32);
            if real {
                pos += 1;
            }
            let query = past + i;
            for key in 0..keys {
                let key_real = if key < past {
                    cached.get(key).copied().unwrap_or(false)
                } else {
                    row[key - past]
                };
                let same_segment = match seg {
                    Some(seg) if key >= past => seg[key - past] == seg[i],
                    _ => true,
                };
                let allowed = key == query || (key < query && key_real && same_segment);
                blocked.push(!allowed);
            }
        }
    }
    // With right padding (or none) a real query only ever sees real keys under the causal
    // rule; pad queries' outputs are never read. Then no mask needs building or applying.
    let pad_before_real = (0..b).any(|bi| {
        let row = &batch.mask[bi * s..(bi + 1) * s];
        let past_pad = past_valid.get(bi).is_some_and(|v| v.iter().any(|&m| !m));
        let any_real = row.iter().any(|&m| m);
        let new_pad_before_real = row.windows(2).any(|w| !w[0] && w[1]);
        let packed = batch.segments.as_ref().is_some_and(|v| {
            let seg = &v[bi * s..(bi + 1) * s];
            seg.windows(2).zip(row.windows(2)).any(|(w, m)| w[0] != w[1] && m[1])
        });
        (past_pad && any_real) || new_pad_before_real || packed
    });
    AttentionPlan {
        positions,
        blocked: pad_before_real.then_some(blocked),
        keys,
    }
}

/// `cos` and `sin` tables `[batch * seq * head_dim]` in HF's layout (`cat(freqs, freqs)`),
/// computed in f32 the way transformers does.
pub(crate) fn rope_tables(positions: &[f32], head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let base = theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    for &p in positions {
        for j in 0..head_dim {
            let angle = p * inv_freq[j % half];
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_left_and_right() {
        let seqs = vec![vec![1, 2, 3], vec![4]];
        let l = TokenBatch::new(&seqs, Padding::Left, 0).unwrap();
        assert_eq!(l.ids, vec![1, 2, 3, 0, 0, 4]);
        assert_eq!(l.mask, vec![true, true, true, false, false, true]);
        let r = TokenBatch::new(&seqs, Padding::Right, 0).unwrap();
        assert_eq!(r.ids, vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(r.lengths(), vec![3, 1]);
        assert!(TokenBatch::new(&[], Padding::Left, 0).is_err());
        assert!(TokenBatch::new(&[vec![]], Padding::Left, 0).is_err());
        let mut bad = r.clone();
        bad.ids.pop();
        assert!(bad.validate().unwrap_err().to_string().contains("inconsistent batch"));
        assert!(r.validate().is_ok());
    }

    #[test]
    fn left_padded_positions_start_at_zero_and_pads_are_blocked() {
        let batch = TokenBatch::new(&[vec![7], vec![1, 2]], Padding::Left, 0).unwrap();
        let p = plan(&batch, &[vec![], vec![]], &[0, 0]);
        assert_eq!(p.positions, vec![0.0, 0.0, 0.0, 1.0]);
        let blocked = p.blocked.expect("left padding needs a mask");
        // sequence 0: pad query sees only itself; real query sees itself, not the pad.
        assert_eq!(&blocked[0..4], &[false, true, true, false]);
        // sequence 1: causal.
        assert_eq!(&blocked[4..8], &[false, true, false, false]);
    }

    #[test]
    fn right_padding_and_unpadded_batches_need_no_mask() {
        let right = TokenBatch::new(&[vec![7], vec![1, 2]], Padding::Right, 0).unwrap();
        assert!(plan(&right, &[vec![], vec![]], &[0, 0]).blocked.is_none());
        // A finished sequence's masked step after real tokens: pad key precedes nothing real.
        let step = TokenBatch::step(&[Some(3), None], 0).unwrap();
        assert!(plan(&step, &[vec![true], vec![true]], &[1, 1]).blocked.is_none());
        // A cached pad followed by a new real token does need the mask.
        assert!(plan(&step, &[vec![false, true], vec![true, true]], &[1, 2]).blocked.is_some());
    }

    #[test]
    fn packed_rows_restart_positions_and_block_other_segments() {
        let batch = TokenBatch::packed(&[vec![vec![1, 2], vec![3]], vec![vec![4]]], 0).unwrap();
        assert_eq!(batch.ids, vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(batch.segments.as_deref(), Some(&[0, 0, 1, 0, 1, 1][..]));
        let p = plan(&batch, &[vec![], vec![]], &[0, 0]);
        assert_eq!(p.positions, vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        let blocked = p.blocked.expect("packing needs a mask");
        // token 3 (row 0, position 2) sees only itself, not tokens 1 and 2.
        assert_eq!(&blocked[6..9], &[true, true, false]);
        assert!(TokenBatch::packed(&[vec![vec![]]], 0).is_err());
    }
}
