//! Runs [`Step`]s with the `iptables` command, or prints them as a shell script.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::rules::{Rule, Step, CHAINS, TABLE};

/// Why the rules could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The iptables binary is not there.
    #[error(
        "cannot run {path:?}: not found; install iptables (Debian: apt-get install iptables) \
         or give its path with --iptables"
    )]
    Missing { path: PathBuf },
    /// The iptables binary is there but cannot be started.
    #[error("cannot run {path:?}: {source}; check that it is an executable iptables, or give another with --iptables")]
    Spawn { path: PathBuf, source: io::Error },
    /// iptables refused: not root, or no CAP_NET_ADMIN / CAP_NET_RAW.
    #[error(
        "`{command}` was not permitted ({stderr}); run trellis-proxy init as root or with the \
         NET_ADMIN and NET_RAW capabilities (Kubernetes: securityContext.capabilities.add: \
         [NET_ADMIN, NET_RAW])"
    )]
    NotPermitted { command: String, stderr: String },
    /// iptables failed for another reason; its own message says why.
    #[error("`{command}` failed with {status}: {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// An iptables binary (`iptables`, `iptables-legacy`, `iptables-nft`, ...).
/// Every command waits for the xtables lock (`-w`) and works on the `nat`
/// table.
#[derive(Clone, Debug)]
pub struct Iptables {
    path: PathBuf,
}

impl Default for Iptables {
    /// `iptables` from `PATH`, whichever backend it is.
    fn default() -> Self {
        Self::new("iptables")
    }
}

impl Iptables {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the steps in order, stopping at the first failure.
    pub fn run(&self, steps: &[Step]) -> Result<(), Error> {
        // Listing the table first finds a missing binary or missing
        // privileges before anything changes, and tells which chains exist.
        let mut chains = self.chains()?;
        for step in steps {
            match step {
                Step::ResetChain(chain) => {
                    let command = if chains.contains(*chain) { "-F" } else { "-N" };
                    self.must(&[command, chain])?;
                    chains.insert(chain.to_string());
                }
                Step::Append(rule) => {
                    self.must(&rule.args("-A"))?;
                }
                Step::Ensure(rule) => {
                    if !self.check(rule)? {
                        self.must(&rule.args("-A"))?;
                    }
                }
                Step::DeleteAll(rule) => {
                    // A jump into a chain of ours that does not exist cannot be
                    // there (and iptables rejects even checking for it).
                    if rule
                        .target()
                        .is_some_and(|t| CHAINS.contains(&t) && !chains.contains(t))
                    {
                        continue;
                    }
                    while self.check(rule)? {
                        self.must(&rule.args("-D"))?;
                    }
                }
                Step::FlushChain(chain) => {
                    if chains.contains(*chain) {
                        self.must(&["-F", chain])?;
                    }
                }
                Step::DeleteChain(chain) => {
                    if chains.remove(*chain) {
                        self.must(&["-X", chain])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The steps as a POSIX shell script doing the same, for `--dry-run`.
    pub fn script(&self, steps: &[Step]) -> String {
        let ipt = |args: &[String]| self.display(args);
        let strs = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut out = String::new();
        for step in steps {
            let _ = match step {
                Step::ResetChain(chain) => writeln!(
                    out,
                    "{} 2>/dev/null || {}",
                    ipt(&strs(&["-N", chain])),
                    ipt(&strs(&["-F", chain]))
                ),
                Step::Append(rule) => writeln!(out, "{}", ipt(&rule.args("-A"))),
                Step::Ensure(rule) => writeln!(
                    out,
                    "{} 2>/dev/null || {}",
                    ipt(&rule.args("-C")),
                    ipt(&rule.args("-A"))
                ),
                Step::DeleteAll(rule) => writeln!(
                    out,
                    "while {} 2>/dev/null; do :; done",
                    ipt(&rule.args("-D"))
                ),
                Step::FlushChain(chain) => {
                    writeln!(out, "{} 2>/dev/null || true", ipt(&strs(&["-F", chain])))
                }
                Step::DeleteChain(chain) => {
                    writeln!(out, "{} 2>/dev/null || true", ipt(&strs(&["-X", chain])))
                }
            };
        }
        out
    }

    /// The user-defined chains in the table (`-N NAME` lines of `-S`).
    fn chains(&self) -> Result<HashSet<String>, Error> {
        let out = self.must(&["-S"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.strip_prefix("-N "))
            .map(|chain| chain.trim().to_string())
            .collect())
    }

    /// Whether `rule` is present (`-C`: exit 0 yes, 1 no).
    fn check(&self, rule: &Rule) -> Result<bool, Error> {
        let args = rule.args("-C");
        let out = self.output(&args)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(self.failure(&args, &out)),
        }
    }

    /// Runs a command that must succeed.
    fn must<S: AsRef<str>>(&self, args: &[S]) -> Result<Output, Error> {
        let out = self.output(args)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(self.failure(args, &out))
        }
    }

    fn output<S: AsRef<str>>(&self, args: &[S]) -> Result<Output, Error> {
        tracing::debug!(command = %self.display(args), "running");
        Command::new(&self.path)
            .args(["-w", "-t", TABLE])
            .args(args.iter().map(AsRef::as_ref))
            .output()
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => Error::Missing {
                    path: self.path.clone(),
                },
                _ => Error::Spawn {
                    path: self.path.clone(),
                    source,
                },
            })
    }

    fn failure<S: AsRef<str>>(&self, args: &[S], out: &Output) -> Error {
        let command = self.display(args);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let denied = [
            "Permission denied",
            "must be root",
            "Operation not permitted",
        ];
        if denied.iter().any(|d| stderr.contains(d)) {
            Error::NotPermitted { command, stderr }
        } else {
            Error::Failed {
                command,
                status: out.status,
                stderr,
            }
        }
    }

    /// The command line, quoted for a POSIX shell.
    fn display<S: AsRef<str>>(&self, args: &[S]) -> String {
        let mut line = quote(&self.path.to_string_lossy());
        for arg in ["-w", "-t", TABLE]
            .into_iter()
            .chain(args.iter().map(AsRef::as_ref))
        {
            line.push(' ');
            line.push_str(&quote(arg));
        }
        line
    }
}

fn quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=,+@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
