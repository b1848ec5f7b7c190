//! The `poseidon-lite image …` commands over the server's image store: import, pull, ls, rm.
//! They work while the server runs (the store's lock file orders changes of names and pins;
//! images are unpacked in a staging directory and renamed into place).

use std::{
    collections::BTreeSet,
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use super::{
    Reference, Store, import, pull,
    registry::Client,
    service::ImagesSettings,
    store::{Progress, StoredImage},
};
use crate::{dto::Environment, error::Error};

/// One `image` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageCommand {
    /// Import an image archive or layout (`-` for stdin).
    Import {
        /// The file or directory.
        file: PathBuf,
        /// The name to store it under (default: the names in the archive).
        name: Option<String>,
    },
    /// Pull an image from its registry.
    Pull {
        /// The image name.
        name: String,
    },
    /// List the stored images.
    Ls,
    /// Remove a name (and the image, when no other name refers to it).
    Rm {
        /// The image name.
        name: String,
    },
}

/// Runs `command` on the store in `state_dir`; the output goes to stdout.
pub fn run(
    command: &ImageCommand,
    state_dir: &Path,
    settings: &ImagesSettings,
) -> Result<(), String> {
    let store = Store::open(state_dir, settings.limits.clone()).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let text = |e: Error| e.to_string();
    match command {
        ImageCommand::Import { file, name } => {
            let started = Instant::now();
            let mut bar = Bar::new();
            let imported = import::import(&store, file, name.as_deref(), &mut |p| bar.show(p))
                .map_err(text)?;
            bar.done();
            let names: Vec<String> = imported.names.iter().map(|n| familiar(n)).collect();
            let _ = writeln!(
                out,
                "imported {} as {} in {:.1} s",
                describe(&imported.image),
                names.join(", "),
                started.elapsed().as_secs_f64()
            );
        }
        ImageCommand::Pull { name } => {
            if settings.offline {
                return Err("images.offline is set: no registry is contacted".into());
            }
            let reference = Reference::parse(name).map_err(text)?;
            let client = Client::new(&settings.registry).map_err(text)?;
            let started = Instant::now();
            let mut bar = Bar::new();
            let image =
                pull::pull(&store, &client, &reference, &mut |p| bar.show(p)).map_err(text)?;
            bar.done();
            let _ = writeln!(
                out,
                "pulled {} as {} in {:.1} s",
                describe(&image),
                reference.familiar(),
                started.elapsed().as_secs_f64()
            );
        }
        ImageCommand::Ls => {
            let refs = store.refs().map_err(text)?;
            let _ = writeln!(
                out,
                "{:<60} {:<14} {:>10}  USER",
                "NAME", "IMAGE ID", "SIZE"
            );
            for (name, entry) in refs {
                let Ok(Some(image)) = store.image(&entry.image) else {
                    continue;
                };
                let user = image
                    .user
                    .as_ref()
                    .map_or("-".to_owned(), |u| format!("{}({})", u.name, u.uid));
                let _ = writeln!(
                    out,
                    "{:<60} {:<14} {:>10}  {user}",
                    familiar(&name),
                    entry.image.short(),
                    megabytes(image.size)
                );
            }
        }
        ImageCommand::Rm { name } => {
            let full = Reference::parse(name).map_err(text)?.to_string();
            let Some((entry, _)) = store.lookup(&full).map_err(text)? else {
                return Err(format!("no image {name} in the store"));
            };
            let users = users(&store, state_dir, &full, &entry.image).map_err(text)?;
            if !users.is_empty() {
                let ids: Vec<String> = users.iter().map(u64::to_string).collect();
                return Err(format!(
                    "image {name} is used by environment(s) {}; delete them first",
                    ids.join(", ")
                ));
            }
            store.untag(&full).map_err(text)?;
            let _ = writeln!(out, "removed {name}");
        }
    }
    Ok(())
}

/// The environments (of the server's state directory) that name `full` or run on `image`.
fn users(
    store: &Store,
    state_dir: &Path,
    full: &str,
    image: &super::Digest,
) -> crate::error::Result<BTreeSet<u64>> {
    let pins = store.pins()?;
    let mut users = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(state_dir.join("environments")) else {
        return Ok(users);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Ok(environment) = serde_json::from_slice::<Environment>(&bytes) else {
            continue;
        };
        let named = Reference::parse(&environment.image).is_ok_and(|r| r.to_string() == full);
        let pinned = pins
            .get(&environment.id)
            .is_some_and(|pin| &pin.image == image);
        if named || pinned {
            users.insert(environment.id);
        }
    }
    Ok(users)
}

fn familiar(full: &str) -> String {
    Reference::parse(full).map_or_else(|_| full.to_owned(), |r| r.familiar())
}

fn describe(image: &StoredImage) -> String {
    let user = image.user.as_ref().map_or("no `user`".to_owned(), |u| {
        format!("user {} uid {}", u.name, u.uid)
    });
    format!(
        "{} ({}, {} layers, {user})",
        image.id.short(),
        megabytes(image.size),
        image.layers
    )
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// A one-line progress display on a terminal (nothing otherwise).
struct Bar {
    terminal: bool,
}

impl Bar {
    fn new() -> Bar {
        Bar {
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, progress: &Progress) {
        if !self.terminal {
            return;
        }
        const WIDTH: usize = 30;
        let fraction = if progress.size == 0 {
            1.0
        } else {
            progress.received as f64 / progress.size as f64
        };
        let filled = ((fraction * WIDTH as f64) as usize).min(WIDTH);
        let state = if progress.unpacked {
            "unpacked"
        } else {
            "fetching"
        };
        eprint!(
            "\rlayer {}/{} {} [{}{}] {} / {} {state}   ",
            progress.layer,
            progress.layers,
            progress.digest.short(),
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            megabytes(progress.received),
            megabytes(progress.size)
        );
    }

    fn done(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}
