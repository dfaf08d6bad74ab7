//! A session's spending limits (`spec.budget`) and what it has spent so far.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::llm::Usage;
use crate::llm::catalog::Price;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Budget {
    pub max_tokens: Option<u64>,
    pub max_usd: Option<f64>,
    /// Spending that pauses the loop for a human to allow more (`approvalPolicy` mode
    /// `Budgeted`), unlike `max_usd`, which ends the turn.
    pub pause_at_usd: Option<f64>,
    /// The model's price; without one, a USD limit cannot be checked and is reported so.
    pub price: Option<Price>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spend {
    pub tokens: u64,
    pub usd: f64,
}

impl Spend {
    pub fn add(&mut self, usage: &Usage, price: Option<&Price>) {
        self.tokens += usage.prompt_tokens + usage.completion_tokens;
        if let Some(p) = price {
            self.usd += p.cost_usd(usage);
        }
    }
}

/// Spending outside model calls (the session's jobs), kept current by whoever follows them
/// while the turn runs; read at each budget check.
#[derive(Debug, Default)]
pub struct JobsSpend(AtomicU64);

impl JobsSpend {
    pub fn set(&self, usd: f64) {
        self.0.store(usd.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Budget {
    /// Why no further model call may be made, if one may not.
    pub fn exceeded(&self, spent: &Spend) -> Option<String> {
        if let Some(max) = self.max_tokens
            && spent.tokens >= max
        {
            return Some(format!(
                "the session used {} tokens, reaching spec.budget.maxTokens ({max}); raise it to go on",
                spent.tokens
            ));
        }
        if let Some(max) = self.max_usd
            && spent.usd >= max
        {
            return Some(format!(
                "the session spent an estimated ${:.4}, reaching spec.budget.maxCostUsd (${max}); raise it to go on",
                spent.usd
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_apply_to_tokens_and_to_estimated_cost() {
        let price = Price {
            input_per_million: 1.0,
            output_per_million: 2.0,
            cached_input_per_million: None,
        };
        let budget = Budget {
            max_tokens: Some(3_000_000),
            max_usd: Some(2.5),
            pause_at_usd: None,
            price: Some(price),
        };
        let mut spent = Spend::default();
        let call = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 0,
            cached_tokens: 0,
        };
        spent.add(&call, budget.price.as_ref());
        spent.add(&call, budget.price.as_ref());
        assert_eq!(budget.exceeded(&spent), None);
        spent.add(&call, budget.price.as_ref());
        let why = budget.exceeded(&spent).unwrap();
        assert!(why.contains("maxTokens"), "{why}");
        let by_cost = Budget {
            max_tokens: None,
            ..budget
        };
        assert!(by_cost.exceeded(&spent).unwrap().contains("maxCostUsd"));
    }
}
