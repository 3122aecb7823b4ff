//! ONNX Runtime provisioning: find the shared library, load it once, and build sessions
//! for a device.
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded at build time and
//! `libonnxruntime.so` is opened when audiocap starts. [`init_runtime`] looks for it in
//! this order and records which route it took ([`LibrarySource`]):
//!
//! 1. `ORT_DYLIB_PATH`, the path of the library file (it must exist);
//! 2. the project's own install, made by `scripts/setup-onnxruntime.sh`:
//!    `${AUDIOCAP_HOME:-$HOME/.local/share/audiocap}/onnxruntime/lib/libonnxruntime.so*`;
//!    then a packaged install beside the executable (`<exe dir>/libonnxruntime.so*`,
//!    `<exe dir>/../lib/libonnxruntime.so*`);
//! 3. the `onnxruntime` (or `onnxruntime-gpu`) Python package of `python3` or `python`:
//!    `onnxruntime/capi/libonnxruntime.so*`.
//!
//! The library must be ONNX Runtime 1.31 or newer (`ort`'s `api-31`): the official
//! wheels `onnxruntime==1.31.1` (CPU) and `onnxruntime-gpu==1.31.1` (CUDA 13) are the
//! reference builds. Sessions are built with [`session_builder`]; CUDA is asked for with
//! `error_on_failure`, never with a silent fall-back to the CPU.
//!
//! Devices are [`crate::config::DeviceSpec`] (the one device grammar). Files, lowest
//! first: `library` (the search, the
//! load and the process's one environment), `builder` (session builders and their
//! execution providers), `doctor` (the `audiocap doctor` report).

mod builder;
mod doctor;
mod library;

pub use builder::{execution_providers, session_builder};
pub use doctor::doctor_report;
pub use library::{
    LibrarySource, MIN_MINOR_VERSION, ORT_DYLIB_PATH, RECOMMENDED_VERSION, RuntimeError,
    RuntimeInfo, SearchStep, environment, init_runtime,
};
