//! Where the image and the run directories are, and building the image when
//! needed (image/build.sh caches by input hash, so this takes seconds when
//! nothing changed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The repository root (this crate lives in `hw-tests/`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `image/out/appliance.img`, or `APPLIANCE_IMAGE` when set.
pub fn image_path() -> PathBuf {
    match std::env::var_os("APPLIANCE_IMAGE") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("image/out/appliance.img"),
    }
}

/// `hw-tests/out/<name>`: a VM's overlay, data disks, sockets and logs.
pub fn run_dir(name: &str) -> PathBuf {
    repo_root().join("hw-tests/out").join(name)
}

/// Makes sure the image is built and current: runs `image/build.sh` (which
/// returns in seconds when its cache has the image), unless
/// `APPLIANCE_IMAGE` points at a prebuilt image or
/// `APPLIANCE_IMAGE_NO_BUILD=1`. The build needs root.
pub fn ensure_image() -> Result<PathBuf> {
    let image = image_path();
    let skip = std::env::var_os("APPLIANCE_IMAGE").is_some()
        || std::env::var("APPLIANCE_IMAGE_NO_BUILD").is_ok_and(|v| v == "1");
    if !skip {
        let script = repo_root().join("image/build.sh");
        eprintln!(
            "appliance-hw-tests: {} (cached unless its inputs changed)",
            script.display()
        );
        let t0 = Instant::now();
        let status = Command::new("bash")
            .arg(&script)
            .current_dir(repo_root())
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status})", script.display());
        }
        eprintln!(
            "appliance-hw-tests: image ready after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    if !image.is_file() {
        bail!(
            "no image at {} (build it with image/build.sh)",
            image.display()
        );
    }
    Ok(image)
}
