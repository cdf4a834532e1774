//! Ctrl-C: the first press asks the training loop to stop at a step
//! boundary with a checkpoint, the second exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static HANDLER: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Records one Ctrl-C; true when it is the second (or later) one.
fn record_interrupt() -> bool {
    INTERRUPTED.swap(true, Ordering::SeqCst)
}

/// Installs the process's Ctrl-C (SIGINT) handler; calling it again does nothing and returns
/// the first call's outcome.
///
/// The first Ctrl-C only sets the flag read by [`interrupted`] (and says so on stderr): the
/// training loop is expected to finish its step, save a checkpoint and stop. A second Ctrl-C
/// exits the process at once with code 130 (the latest complete checkpoint stays usable, as
/// checkpoints are written atomically). Fails if another Ctrl-C handler is already installed (for example by
/// another crate) or the OS refuses.
pub fn install_interrupt_handler() -> std::io::Result<()> {
    HANDLER
        .get_or_init(|| {
            ctrlc::set_handler(|| {
                if record_interrupt() {
                    eprintln!("\ninterrupted again: exiting now");
                    std::process::exit(130);
                }
                eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(std::io::Error::other)
}

/// Whether Ctrl-C has been pressed since the handler was installed (see
/// [`install_interrupt_handler`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All interrupt checks in one test: the flag is process-global.
    #[test]
    fn interrupt_handler_sets_the_flag() {
        install_interrupt_handler().unwrap();
        install_interrupt_handler().unwrap();
        assert!(!interrupted());
        #[cfg(unix)]
        {
            // A real SIGINT to this process: the handler catches it and only sets the flag.
            let status = std::process::Command::new("kill")
                .args(["-INT", &std::process::id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let start = std::time::Instant::now();
            while !interrupted() && start.elapsed() < std::time::Duration::from_secs(10) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(interrupted());
        }
        #[cfg(not(unix))]
        assert!(!record_interrupt());
        // A second interrupt would exit (the handler does); `record_interrupt` reports it.
        assert!(record_interrupt());
        INTERRUPTED.store(false, Ordering::SeqCst);
        assert!(!interrupted());
    }
}
