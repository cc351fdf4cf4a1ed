//! Stage 7 (agent): where profiles go. [`files`] writes rotating local files;
//! [`grpc`] exports OTLP to a backend through the bounded [`queue`].

pub mod files;
pub mod grpc;
pub mod queue;
