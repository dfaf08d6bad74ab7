//! The agent core: conversation messages, the events a turn emits, and the loop that drives
//! a model and its tools. Nothing here knows about Kubernetes, so the same loop can run in
//! the controller, in tests without a cluster, or in a local process.

pub mod approval;
pub mod budget;
pub mod context;
pub mod event;
pub mod guards;
pub mod journal;
pub mod message;
pub mod prompt;
pub mod turn;

pub use event::AgentEvent;
pub use journal::{Journal, JournalError, NoJournal};
pub use message::{ChatMessage, ToolCall};
pub use turn::{Turn, TurnConfig, TurnFailure, TurnOutcome};
