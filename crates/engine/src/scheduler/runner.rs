//! The model runner: one forward pass over a step's batch, apart from the scheduling policy
//! (`policy`) and the bookkeeping around it (`model_scheduler`), as vLLM v1 keeps its
//! `GPUModelRunner` apart from its scheduler.

use crate::kv_cache::KvCache;
use crate::model::{Model, SeqInput};
use crate::Result;

/// Runs a batch: writes every input's KV into its block table and returns the logits rows
/// of the inputs that ask for them (`SeqInput::logits`), in input order.
pub(crate) trait ModelRunner: Send {
    fn forward(&mut self, inputs: &[SeqInput], kv: &KvCache) -> Result<Vec<Vec<f32>>>;
}

impl ModelRunner for Model {
    fn forward(&mut self, inputs: &[SeqInput], kv: &KvCache) -> Result<Vec<Vec<f32>>> {
        Ok(Model::forward(self, inputs, kv)?.to_vec2::<f32>()?)
    }
}
