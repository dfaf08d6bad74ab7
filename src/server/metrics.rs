//! Prometheus metrics of the controller and the agent loops it runs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::api::SessionPhase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabel {
    pub tool: String,
}

pub struct Metrics {
    registry: Registry,
    pub sessions_started: Counter,
    pub sessions_running: Gauge,
    pub sessions_finished: Family<PhaseLabel, Counter>,
    pub llm_calls: Counter,
    pub llm_prompt_tokens: Counter,
    pub llm_completion_tokens: Counter,
    pub tool_calls: Family<ToolLabel, Counter>,
    pub reconcile_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ml_intern");
        let m = Metrics {
            sessions_started: Counter::default(),
            sessions_running: Gauge::default(),
            sessions_finished: Family::default(),
            llm_calls: Counter::default(),
            llm_prompt_tokens: Counter::default(),
            llm_completion_tokens: Counter::default(),
            tool_calls: Family::default(),
            reconcile_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sessions_started",
            "Agent loops started",
            m.sessions_started.clone(),
        );
        registry.register(
            "sessions_running",
            "Agent loops running now",
            m.sessions_running.clone(),
        );
        registry.register(
            "sessions_finished",
            "Sessions that ended, by final phase",
            m.sessions_finished.clone(),
        );
        registry.register(
            "llm_calls",
            "Model calls that succeeded",
            m.llm_calls.clone(),
        );
        registry.register(
            "llm_prompt_tokens",
            "Prompt tokens reported by model endpoints",
            m.llm_prompt_tokens.clone(),
        );
        registry.register(
            "llm_completion_tokens",
            "Completion tokens reported by model endpoints",
            m.llm_completion_tokens.clone(),
        );
        registry.register("tool_calls", "Tool calls by tool", m.tool_calls.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were requeued",
            m.reconcile_errors.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn tool_calls_inc(&self, tool: &str) {
        self.tool_calls
            .get_or_create(&ToolLabel { tool: tool.into() })
            .inc();
    }

    pub fn sessions_finished_inc(&self, phase: SessionPhase) {
        self.sessions_finished
            .get_or_create(&PhaseLabel {
                phase: format!("{phase:?}"),
            })
            .inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_in_openmetrics_text() {
        let m = Metrics::default();
        m.tool_calls_inc("bash");
        m.sessions_finished_inc(SessionPhase::Succeeded);
        let text = m.encode().unwrap();
        assert!(
            text.contains("ml_intern_tool_calls_total{tool=\"bash\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ml_intern_sessions_finished_total{phase=\"Succeeded\"} 1"),
            "{text}"
        );
        assert!(text.contains("# EOF"));
    }
}
