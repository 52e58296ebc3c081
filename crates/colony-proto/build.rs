//! Compiles proto/colony/v1 with protox (pure Rust): no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("colony/v1/admin.proto"),
        root.join("colony/v1/raft.proto"),
        root.join("colony/v1/executor.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("colony_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_build::configure().build_server(true).build_client(true).compile_fds(descriptors)?;
    Ok(())
}
