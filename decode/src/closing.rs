//! Finishing a constrained sequence inside its token budget.
//!
//! A grammar guarantees that every token keeps the output *completable*, not that it completes
//! before `max_new_tokens`: a small model can stay inside a string or a number until the
//! budget runs out, and the truncated JSON then fails validation. So, near the end of the
//! budget, the generator measures how many tokens the grammar still needs — by running a
//! closing policy on a copy of the matcher — and, once that cost reaches the tokens left,
//! stops sampling and follows the policy: among the tokens the grammar allows, the one that
//! closes soonest (end of sequence, then `"` `}` `]`, then short literals such as `null`
//! or `0`, then separators, then the shortest other token; earlier choices count against
//! a token, so the policy cannot cycle). The policy ignores the model, so the measured cost
//! is exact: a sequence whose cost never jumps by more than the margin ([`MARGIN`], less for
//! short budgets) between two measurements always finishes.

use llguidance::toktrie::TokTrie;
use llguidance::Matcher;

/// Tokens of extra headroom: one sampled token (plus what the grammar then forces) may raise
/// the closing cost by about this much before the next measurement. Budgets under 4 × this
/// get a quarter of the budget, so a short budget is still sampled from the model.
pub const MARGIN: usize = 16;
/// Steps between measurements while the end of the budget is still far.
const PERIOD: usize = 8;

/// Per-token closing rank: lower finishes the grammar sooner.
pub(crate) struct ClosingRanks {
    ranks: Vec<u16>,
    quote: Option<u32>,
}

impl ClosingRanks {
    pub(crate) fn new(trie: &TokTrie, eos: &[u32]) -> Self {
        let ranks = (0..trie.vocab_size() as u32)
            .map(|t| if eos.contains(&t) { 0 } else { rank_of(trie.token(t)) })
            .collect();
        Self { ranks, quote: trie.token_id(b"\"") }
    }

    fn rank(&self, token: u32) -> u16 {
        self.ranks.get(token as usize).copied().unwrap_or(u16::MAX)
    }

    /// The allowed token that closes soonest (ties go to the lower id). Earlier choices count
    /// against a token (its uses; for a closer, its current run), so the policy cannot
    /// cycle: `0.` followed by `0` forever never ends a number with `exclusiveMinimum: 0`,
    /// and `}` is a character an email's local part may repeat without end. The choice does
    /// not depend on the model, so the measured cost is exactly what closing then takes.
    pub(crate) fn pick(&self, allowed: &[u32], used: &Uses) -> Option<u32> {
        allowed.iter().copied().min_by_key(|&t| {
            let rank = self.rank(t);
            let penalty = match rank {
                // A lone `"` always ends or completes a string: never a detour.
                _ if Some(t) == self.quote => 0,
                // Closers repeat legitimately (`}}]`), but not without end: count the
                // current run of the same closer.
                0..=2 => used.streak(t),
                _ => used.count(t).saturating_mul(8),
            };
            (rank.saturating_add(penalty), t)
        })
    }
}

/// The closing policy's choices in one run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Uses {
    counts: std::collections::HashMap<u32, u16>,
    last: Option<(u32, u16)>,
}

impl Uses {
    fn count(&self, token: u32) -> u16 {
        self.counts.get(&token).copied().unwrap_or(0)
    }

    /// How many times in a row `token` was the last choice.
    fn streak(&self, token: u32) -> u16 {
        match self.last {
            Some((t, n)) if t == token => n,
            _ => 0,
        }
    }

    pub(crate) fn add(&mut self, token: u32) {
        let n = self.counts.entry(token).or_insert(0);
        *n = n.saturating_add(1);
        let streak = self.streak(token).saturating_add(1);
        self.last = Some((token, streak));
    }
}

fn rank_of(bytes: &[u8]) -> u16 {
    const CLOSERS: &[u8] = b"\"}]";
    match bytes {
        [] => u16::MAX,
        // Added tokens the grammar allows are its own markers (`</think>`): they end a
        // section, and inside free reasoning a `"` would only be more text.
        [TokTrie::SPECIAL_TOKEN_MARKER, ..] => 1,
        [c] if CLOSERS.contains(c) => 2,
        b"null" | b"0" | b"false" | b"true" | b"[]" | b"{}" | b"\"\"" => 3,
        // `"}` or `}}` inside a string are two characters of text, not two closers.
        b if b.iter().all(|c| CLOSERS.contains(c)) => 4,
        b if b.iter().all(|c| b",:".contains(c)) => 4,
        // What ends an email's local part.
        b"@" => 5,
        b if b.iter().all(u8::is_ascii_whitespace) => 1000,
        b => 5 + b.len().min(900) as u16,
    }
}

/// Tokens (forced ones and the end-of-sequence token included) the closing policy needs to
/// finish the grammar from `matcher`'s state; `None` when more than `limit` or when the
/// grammar cannot be finished. `prefix` is written first (what the forced tokens leave
/// open: a plain-text `</think>` that the generator writes itself, which no ranking finds).
pub(crate) fn closing_cost(matcher: &Matcher, ranks: &ClosingRanks, limit: usize, prefix: &[u32]) -> Option<usize> {
    let mut m = matcher.deep_clone();
    let mut used = 0;
    if !prefix.is_empty() && !m.is_stopped() {
        let ff = m.compute_ff_tokens();
        m.consume_tokens(&ff).ok()?;
        used += ff.len();
        // Bytes the grammar forces that no whole token covers yet (before the first sampled
        // token, the `>` of `<think>`: a longer token may still start with it) come before
        // the prefix, tokenized with it; the prefix alone does not fit that state.
        let pending = m.compute_ff_bytes();
        let tokens = if pending.is_empty() {
            prefix.to_vec()
        } else {
            let env = m.tok_env().ok()?;
            let mut bytes = pending;
            bytes.extend(env.tok_trie().decode(prefix));
            env.tokenize_bytes(&bytes)
        };
        m.consume_tokens(&tokens).ok()?;
        used += tokens.len();
    }
    let mut uses = Uses::default();
    loop {
        if m.is_stopped() {
            return Some(used);
        }
        if used >= limit {
            return None;
        }
        let mask = m.compute_mask().ok()?;
        let mut allowed = Vec::new();
        mask.iter_set_entries(|i| allowed.push(i as u32));
        let token = ranks.pick(&allowed, &uses)?;
        uses.add(token);
        used += 1;
        if ranks.rank(token) == 0 {
            // End of sequence: allowed only where the grammar accepts.
            return Some(used);
        }
        m.consume_token(token).ok()?;
        if !m.is_stopped() {
            let ff = m.compute_ff_tokens();
            m.consume_tokens(&ff).ok()?;
            used += ff.len();
        }
    }
}

/// When to measure the closing cost, per sequence.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClosingWatch {
    /// Set once the policy has taken over.
    pub closing: bool,
    /// The policy's choices so far (it avoids repeating them).
    pub uses: Uses,
    /// The last measured cost (`None` before the first measurement).
    last_cost: Option<usize>,
    since: usize,
    /// Headroom, fixed at the first measurement from the whole budget.
    margin: usize,
}

impl ClosingWatch {
    /// Whether the policy must choose this step's token, given the tokens left (this one
    /// included). Measures only near the end of the budget, every step once close.
    pub(crate) fn must_close(&mut self, matcher: &Matcher, ranks: &ClosingRanks, remaining: usize, prefix: &[u32]) -> bool {
        if self.closing {
            return true;
        }
        self.since += 1;
        let due = match self.last_cost {
            None => {
                self.margin = MARGIN.min(remaining / 4).max(1);
                true
            }
            Some(c) if remaining > 4 * c + 4 * self.margin => false,
            Some(c) => remaining <= c + 2 * self.margin || self.since >= PERIOD,
        };
        if !due {
            return false;
        }
        self.since = 0;
        let cost = closing_cost(matcher, ranks, remaining, prefix);
        self.last_cost = Some(cost.unwrap_or(remaining));
        self.closing = cost.is_none_or(|c| c + self.margin >= remaining);
        self.closing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closers_rank_before_literals_separators_and_text() {
        assert!(rank_of(&[TokTrie::SPECIAL_TOKEN_MARKER, b'x']) < rank_of(b"\""));
        assert_eq!(rank_of(b"\""), rank_of(b"}"));
        assert!(rank_of(b"}") < rank_of(b"null"));
        assert!(rank_of(b"null") < rank_of(b"\"}"));
        assert!(rank_of(b"null") < rank_of(b","));
        assert!(rank_of(b",") < rank_of(b"@"));
        assert!(rank_of(b"ab") < rank_of(b"abcdef"));
        assert!(rank_of(b"abcdef") < rank_of(b"  "));
    }
}
