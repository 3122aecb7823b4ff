//! `audiocap doctor`: which ONNX Runtime library is used and what it offers.

use super::exit::Exit;

pub fn run() -> anyhow::Result<Exit> {
    println!("{}", audiocap::engine::runtime::doctor_report());
    Ok(Exit::Ok)
}
