//! Compiles `corsair/v1/*.proto` without a system `protoc`.
//!
//! `protox` parses the files into a `FileDescriptorSet`, which is written to
//! `OUT_DIR/corsair_descriptor.bin` (for gRPC server reflection) and handed
//! to `tonic-prost-build` to generate messages, clients and servers.

use std::env;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

/// Directory, relative to the crate root, holding the `corsair.v1` files.
const PROTO_DIR: &str = "corsair/v1";

/// Name of the encoded descriptor set written to `OUT_DIR`.
const DESCRIPTOR_FILE: &str = "corsair_descriptor.bin";

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR unset")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR unset")?);

    println!("cargo:rerun-if-changed={PROTO_DIR}");
    let protos = proto_files(&root.join(PROTO_DIR))?;
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&protos)?;

    fs::write(
        out_dir.join(DESCRIPTOR_FILE),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::Codec")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// The `.proto` files directly in `dir`, sorted for a stable build.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut protos = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            protos.push(path);
        }
    }
    protos.sort();
    if protos.is_empty() {
        return Err(format!("no .proto files in {}", dir.display()).into());
    }
    Ok(protos)
}
