//! Process titles, as `ps` and `/proc/PID/cmdline` show them (DESIGN.md "Names"): the server
//! sets them, the sidecar finds roles by them, so both take the format from here:
//! `forkscope-server: leader [APP]` and `forkscope-server: worker N [APP]`.

/// What every title of a forkscope-server process starts with.
pub const PREFIX: &str = "forkscope-server: ";

/// The role a forkscope-server title names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Title {
    /// `forkscope-server: leader [APP]`.
    Leader {
        /// APP.
        app: String,
    },
    /// `forkscope-server: worker N [APP]`.
    Worker {
        /// N, the stable 0-based slot.
        slot: u32,
        /// APP.
        app: String,
    },
}

impl Title {
    /// The title text.
    pub fn render(&self) -> String {
        match self {
            Title::Leader { app } => format!("{PREFIX}leader [{app}]"),
            Title::Worker { slot, app } => format!("{PREFIX}worker {slot} [{app}]"),
        }
    }

    /// Reads a title; `None` when `text` is not a forkscope-server title (or a malformed one).
    pub fn parse(text: &str) -> Option<Title> {
        let rest = text.trim().strip_prefix(PREFIX)?;
        let bracketed = |s: &str| Some(s.strip_prefix('[')?.strip_suffix(']')?.to_owned());
        if let Some(app) = rest.strip_prefix("leader ") {
            return Some(Title::Leader {
                app: bracketed(app)?,
            });
        }
        let (slot, app) = rest.strip_prefix("worker ")?.split_once(' ')?;
        Some(Title::Worker {
            slot: slot.parse().ok()?,
            app: bracketed(app)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_follow_the_design_and_read_back() {
        let leader = Title::Leader {
            app: "app:app".into(),
        };
        let worker = Title::Worker {
            slot: 3,
            app: "web:create_app()".into(),
        };
        assert_eq!(leader.render(), "forkscope-server: leader [app:app]");
        assert_eq!(
            worker.render(),
            "forkscope-server: worker 3 [web:create_app()]"
        );
        for t in [leader, worker] {
            assert_eq!(Title::parse(&t.render()), Some(t));
        }
    }

    #[test]
    fn other_titles_are_none() {
        for text in [
            "gunicorn: master [app]",
            "forkscope-server: worker x [app]",
            "forkscope-server: worker 1 app",
            "forkscope-server: leader app",
            "forkscope-server: janitor [app]",
        ] {
            assert_eq!(Title::parse(text), None, "{text}");
        }
    }
}
