//! How much of a batch one forward/backward pass may hold: training memory is bounded by a
//! token budget per pass, so no batch size, accumulation or sequence length can ask for more
//! than the budget's worth of activations at once.
//!
//! A trainer's micro-batch (the unit its loss is normalised over) is cut into pieces of
//! consecutive rows whose padded size `rows × longest` fits
//! `max_tokens_per_micro_batch`; each piece's graph is built, differentiated and dropped
//! before the next, and its gradients summed. Since every loss is a weighted sum over tokens
//! whose weights are fixed per micro-batch, the pieces change memory, not the update (up to
//! float summation order). A row is never split: one longer than the budget is a piece by
//! itself, so the sequence-length limits (`max_len`, `max_prompt_len + max_completion_len`)
//! bound that case.

use std::ops::Range;

use crate::config::ModelConfig;

/// Activation memory a pass may take when `max_tokens_per_micro_batch = 0` (automatic):
/// 4 GiB, which with the weights, gradients and AdamW state of a ≤ 0.5B model (or a LoRA
/// adapter on a 1.5B one) stays well inside a 24 GiB machine.
pub const DEFAULT_ACTIVATION_BYTES: u64 = 4 << 30;

/// Bytes one token of a training pass keeps for the backward pass (f32): per layer, the
/// saved inputs and outputs of the norms, projections, RoPE and the SwiGLU MLP (about 16
/// hidden-sized and 8 intermediate-sized vectors; attention keeps no `seq × seq` tensor on
/// the CPU backend, see `lean_attention`, and the SwiGLU keeps 3 intermediate-sized vectors
/// there, see `lean_mlp`), plus the log-softmax of the vocabulary row if the token is
/// scored. Measured on SmolLM2-135M at 1,024 tokens: 2.6 MB per token before `lean_mlp`,
/// 0.37 MB less with it, against 3.2 MB estimated; the estimate errs high.
pub fn training_bytes_per_token(config: &ModelConfig) -> u64 {
    let per_layer = 16 * config.hidden_size + 8 * config.intermediate_size;
    let floats = config.num_hidden_layers * per_layer + 3 * config.vocab_size;
    4 * floats as u64
}

/// The token budget used when the setting is 0: [`DEFAULT_ACTIVATION_BYTES`] over
/// [`training_bytes_per_token`] (SmolLM2-135M: 1,354 tokens; Qwen2.5-1.5B: 340).
pub fn auto_tokens_per_pass(config: &ModelConfig) -> usize {
    (DEFAULT_ACTIVATION_BYTES / training_bytes_per_token(config).max(1)).max(1) as usize
}

/// The token budget of a run: `setting`, or the automatic one when it is 0.
pub fn tokens_per_pass(setting: usize, config: &ModelConfig) -> usize {
    if setting == 0 {
        auto_tokens_per_pass(config)
    } else {
        setting
    }
}

/// Consecutive ranges of rows (lengths in order) whose `rows × longest row` fits `budget`;
/// a row longer than the budget is a range by itself.
pub fn token_pieces(lengths: &[usize], budget: usize) -> Vec<Range<usize>> {
    let mut pieces = Vec::new();
    let (mut start, mut longest) = (0, 0);
    for (i, &len) in lengths.iter().enumerate() {
        let wider = longest.max(len);
        if i > start && wider * (i + 1 - start) > budget {
            pieces.push(start..i);
            start = i;
            longest = len;
        } else {
            longest = wider;
        }
    }
    if start < lengths.len() {
        pieces.push(start..lengths.len());
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_fit_the_budget_and_keep_every_row_once() {
        assert_eq!(token_pieces(&[100, 100, 100], 250), vec![0..2, 2..3]);
        // Padding counts: the longest row sets the width.
        assert_eq!(token_pieces(&[10, 200, 10, 10], 300), vec![0..1, 1..2, 2..4]);
        // A row over the budget stands alone.
        assert_eq!(token_pieces(&[50, 900, 50], 100), vec![0..1, 1..2, 2..3]);
        assert_eq!(token_pieces(&[5; 7], 1000), vec![0..7]);
        assert!(token_pieces(&[], 10).is_empty());
    }

    #[test]
    fn the_automatic_budget_shrinks_with_the_model() {
        let small = ModelConfig::preset("smollm2-135m").map(|c| auto_tokens_per_pass(&c));
        let large = ModelConfig::preset("qwen2.5-1.5b").map(|c| auto_tokens_per_pass(&c));
        let (Ok(small), Ok(large)) = (small, large) else { panic!("presets") };
        assert!((1000..2000).contains(&small), "{small}");
        assert!((200..500).contains(&large), "{large}");
        assert_eq!(tokens_per_pass(0, &ModelConfig::preset("smollm2-135m").unwrap_or_else(|_| panic!())), small);
        assert_eq!(tokens_per_pass(77, &ModelConfig::preset("smollm2-135m").unwrap_or_else(|_| panic!())), 77);
    }
}
