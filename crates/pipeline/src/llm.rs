//! The one door to the models: `LanguageModel`, implemented by the engine's `LlmClient`.
//! Unit tests put a scripted model behind the same trait.

use std::future::Future;
use std::pin::Pin;

use forgeline_engine::scheduler::{Completion, GenerateRequest, LlmClient};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs one generation to the end. Dropping the future cancels it (the engine frees its
/// KV blocks at the next step).
pub trait LanguageModel: Send + Sync {
    fn complete(&self, req: GenerateRequest)
        -> BoxFuture<'_, forgeline_engine::Result<Completion>>;

    /// Names of the loaded models; the first is the default.
    fn models(&self) -> Vec<String>;

    /// The context length of a model (None: the default).
    fn context_length(&self, model: Option<&str>) -> forgeline_engine::Result<usize>;

    /// How many tokens the request's prompt is.
    fn prompt_tokens(&self, req: &GenerateRequest) -> forgeline_engine::Result<usize>;
}

impl LanguageModel for LlmClient {
    fn complete(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'_, forgeline_engine::Result<Completion>> {
        Box::pin(LlmClient::complete(self, req))
    }

    fn models(&self) -> Vec<String> {
        self.model_names()
    }

    fn context_length(&self, model: Option<&str>) -> forgeline_engine::Result<usize> {
        LlmClient::context_length(self, model)
    }

    fn prompt_tokens(&self, req: &GenerateRequest) -> forgeline_engine::Result<usize> {
        Ok(self.tokenize(req)?.len())
    }
}
