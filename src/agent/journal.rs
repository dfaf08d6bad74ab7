//! Where a turn makes its conversation durable. The loop waits for the journal before it
//! acts: the model's tool calls are recorded before any of them runs and each result as
//! soon as it exists, so a process that dies mid-turn can resume without running a
//! completed call twice.

use async_trait::async_trait;
use thiserror::Error;

use super::ChatMessage;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct JournalError(pub String);

#[async_trait]
pub trait Journal: Send + Sync {
    /// Records `messages`, appended to the conversation in this order.
    async fn append(&self, messages: &[ChatMessage]) -> Result<(), JournalError>;

    /// Records that the conversation was replaced as a whole (after compaction).
    async fn replace(&self, history: &[ChatMessage]) -> Result<(), JournalError>;
}

/// A journal that keeps nothing: for runs that need no resume (tests, benchmarks).
pub struct NoJournal;

#[async_trait]
impl Journal for NoJournal {
    async fn append(&self, _: &[ChatMessage]) -> Result<(), JournalError> {
        Ok(())
    }

    async fn replace(&self, _: &[ChatMessage]) -> Result<(), JournalError> {
        Ok(())
    }
}
