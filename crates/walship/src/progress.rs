//! The progress bar of `walship restore` on a terminal: bytes of the replica's objects read
//! out of those the restore planned, their rate and the time left, then "verifying" while
//! the restored file is flushed and checked. Nothing is drawn when stderr is not a
//! terminal (a container's log, a pipe), so logs and scripts see only the result line.

use std::io::IsTerminal;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use walship_engine::RestoreProgress;

const TEMPLATE: &str =
    "{msg:>9} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} left";

/// A restore's progress bar on stderr.
#[derive(Debug)]
pub struct RestoreBar(ProgressBar);

impl RestoreBar {
    /// A bar drawn on stderr if stderr is a terminal; `None` otherwise.
    pub fn on_terminal() -> Option<Arc<RestoreBar>> {
        std::io::stderr()
            .is_terminal()
            .then(|| Arc::new(RestoreBar::new(ProgressDrawTarget::stderr())))
    }

    fn new(target: ProgressDrawTarget) -> RestoreBar {
        let bar = ProgressBar::with_draw_target(Some(0), target);
        let style = ProgressStyle::with_template(TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message("restoring");
        RestoreBar(bar)
    }

    /// Removes the bar, before the restore's result is printed.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl RestoreProgress for RestoreBar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
        self.0.set_message("restoring");
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn verifying(&self) {
        self.0.set_message("verifying");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_follows_a_restore_and_starts_over_when_it_falls_back() {
        let bar = RestoreBar::new(ProgressDrawTarget::hidden());
        bar.start(1000);
        bar.advance(400);
        bar.advance(100);
        assert_eq!((bar.0.position(), bar.0.length()), (500, Some(1000)));
        assert_eq!(bar.0.message(), "restoring");
        // A fallback to an older point plans other objects.
        bar.start(300);
        assert_eq!((bar.0.position(), bar.0.length()), (0, Some(300)));
        bar.advance(300);
        bar.verifying();
        assert_eq!(bar.0.position(), 300);
        assert_eq!(bar.0.message(), "verifying");
        bar.finish();
        assert!(bar.0.is_finished());
    }

    #[test]
    fn the_template_parses() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
    }
}
