//! QEMU harness for the appliance image (QEMU hardware test tier).
//!
//! - [`image`]: where the image is, and building it when its inputs changed
//!   (`image/build.sh`, cached by input hash outside the repository);
//! - [`vm`]: one VM — QEMU/TCG booting the image from disk under OVMF, a
//!   qcow2 overlay so the image stays pristine, six sparse data disks with
//!   stable serials in fixed PCI slots (the bays of the udev bay map), the sync
//!   and metrics ports forwarded to 127.0.0.1, the serial console in a file;
//! - [`qmp`]: QEMU Machine Protocol (hot-unplug, power, events);
//! - [`agent`]: the guest agent as the command channel into the guest. It is
//!   independent of the serial console, so a command that hangs (a suspended
//!   pool) costs only its own timeout.
//!
//! Every wait has a deadline; a failure carries the console tail (and, via
//! [`vm::Vm::diagnostics`], the journal tail).
//!
//! The tests that boot the image are `#[ignore]`d, so `cargo test --workspace`
//! stays fast: `cargo test -p appliance-hw-tests --test smoke -- --ignored`.
//! The binary `appliance-vm` boots the appliance for a person.

pub mod agent;
pub mod image;
mod jsonline;
pub mod qmp;
pub mod scenario;
pub mod vm;
