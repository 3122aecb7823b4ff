//! Integration tests, compiled as one binary. They read the reference fixtures from
//! `../shared/fixtures` (relative to the repository root) and compare by value.

mod common;

mod audio_inputs;
mod beats_parity;
mod captioning;
mod cli;
mod codecs;
mod container_image;
mod corpus_build;
mod dataset_sink;
mod default_model;
mod deploy_recipes;
mod eval_cli;
mod fbank_parity;
mod fense_parity;
mod fuzz;
mod large_export;
mod layers;
mod llama_parity;
mod lora_adapters;
mod metrics_parity;
mod onnx_engine;
mod pipeline_run;
mod storage_inputs;
mod tags_embeddings;
mod train_parity;
mod training;
