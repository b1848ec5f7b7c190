//! The images of a running server: environment PUTs resolve a registry image's manifest at
//! once and pull its layers in the background; runners wait (bounded) for their image; the
//! image each environment runs on is pinned in the store, so a restart uses the same one.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use super::{
    Digest, Limits, Reference, Store, StoredImage, pull,
    registry::{Client, RegistryConfig},
    store::{Pin, Progress, RefEntry},
};
use crate::{
    error::{Error, Result},
    metrics::{Metrics, PullGuard},
};

/// What the server's image handling needs from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImagesSettings {
    /// How to reach registries.
    pub registry: RegistryConfig,
    /// Unpacking bounds.
    pub limits: Limits,
    /// Never contact a registry: only stored (imported or earlier pulled) images are used.
    pub offline: bool,
}

/// Registry images of a running server.
#[derive(Debug)]
pub struct Images {
    store: Store,
    client: Client,
    offline: bool,
    state: Mutex<State>,
    changed: Condvar,
    /// The server's metrics: pulls in progress and their results.
    metrics: OnceLock<Arc<Metrics>>,
}

#[derive(Debug, Default)]
struct State {
    /// Pulls in flight or failed, by full name.
    pulls: HashMap<String, Pull>,
    /// Stored images read so far, by id.
    cache: HashMap<Digest, StoredImage>,
}

#[derive(Debug)]
enum Pull {
    /// Environments waiting for the image, pinned when it is ready.
    Running(Vec<u64>),
    Failed(String),
}

/// A ready image: its unpacked root and configuration.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The unpacked root directory.
    pub root: PathBuf,
    /// The image's configuration.
    pub image: StoredImage,
}

impl Images {
    /// Opens the store under `state_dir` and prepares the registry client.
    pub fn open(state_dir: &std::path::Path, settings: &ImagesSettings) -> Result<Arc<Images>> {
        let store = Store::open(state_dir, settings.limits.clone())?;
        let client = Client::new(&settings.registry)?;
        Ok(Arc::new(Images {
            store,
            client,
            offline: settings.offline,
            state: Mutex::default(),
            changed: Condvar::new(),
            metrics: OnceLock::new(),
        }))
    }

    /// Counts pulls in the server's metrics from now on.
    pub fn attach_metrics(&self, metrics: &Arc<Metrics>) {
        let _ = self.metrics.set(Arc::clone(metrics));
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// For an environment PUT: the image is stored, or its manifest is resolved now (so a
    /// missing image or an unreachable registry is the request's error) and its layers are
    /// pulled in the background.
    pub fn prepare(self: &Arc<Self>, environment: u64, name: &str) -> Result<()> {
        let reference = parse(name)?;
        let full = reference.to_string();
        if self.stored(environment, &full)?.is_some() {
            return Ok(());
        }
        if self.join_pull(&full, environment) {
            return Ok(());
        }
        if self.offline {
            return Err(Error::UnknownImage(name.to_owned()));
        }
        let remote = pull::resolve(&self.client, &reference)?;
        let entry = RefEntry {
            image: remote.resolved.config_digest.clone(),
            manifest: remote.resolved.manifest_digest.clone(),
        };
        if self.store.image(&entry.image)?.is_some() {
            self.store.tag(&full, entry.clone())?;
            self.pin(environment, &full, entry)?;
            return Ok(());
        }
        {
            let mut state = self.state.lock().unwrap();
            if let Some(Pull::Running(envs)) = state.pulls.get_mut(&full) {
                envs.push(environment);
                return Ok(());
            }
            state
                .pulls
                .insert(full.clone(), Pull::Running(vec![environment]));
        }
        log::info!("pulling image {full} (manifest {})", entry.manifest);
        let images = Arc::clone(self);
        let counted = self.metrics.get().map(|m| m.image_pull_started(&full));
        let spawned = thread::Builder::new()
            .name(format!("pull-{}", entry.image.short()))
            .spawn(move || images.finish_pull(&full, &remote, counted));
        if let Err(e) = spawned {
            return Err(Error::internal("cannot start a pull", e));
        }
        Ok(())
    }

    fn finish_pull(&self, full: &str, remote: &pull::Remote, counted: Option<PullGuard>) {
        let started = Instant::now();
        let mut log_progress = |p: &Progress| {
            if p.unpacked {
                log::info!(
                    "image {full}: layer {}/{} ({}, {} bytes) unpacked",
                    p.layer,
                    p.layers,
                    p.digest.short(),
                    p.size
                );
            } else {
                log::info!(
                    "image {full}: layer {}/{} ({}): {} of {} bytes",
                    p.layer,
                    p.layers,
                    p.digest.short(),
                    p.received,
                    p.size
                );
            }
        };
        let result = pull::install(&self.store, &self.client, remote, &mut log_progress);
        if let Some(counted) = counted {
            let outcome = result.as_ref().map(|image| image.size);
            counted.finish(outcome.map_err(|e| format!("{full}: {e}")));
        }
        let mut state = self.state.lock().unwrap();
        let waiting = match state.pulls.remove(full) {
            Some(Pull::Running(envs)) => envs,
            _ => Vec::new(),
        };
        match result {
            Ok(image) => {
                log::info!(
                    "image {full} ready: {} bytes in {:.1} s",
                    image.size,
                    started.elapsed().as_secs_f64()
                );
                let entry = RefEntry {
                    image: image.id.clone(),
                    manifest: image.manifest.clone(),
                };
                state.cache.insert(image.id.clone(), image);
                drop(state);
                for environment in waiting {
                    if let Err(e) = self.pin(environment, full, entry.clone()) {
                        log::error!("environment {environment}: {e}");
                    }
                }
            }
            Err(e) => {
                log::error!("cannot pull image {full}: {e}");
                state
                    .pulls
                    .insert(full.to_owned(), Pull::Failed(e.to_string()));
                drop(state);
            }
        }
        self.changed.notify_all();
    }

    /// Joins a running pull of `full`; `false` if there is none (a failed one is forgotten,
    /// so a repeated PUT tries again).
    fn join_pull(&self, full: &str, environment: u64) -> bool {
        let mut state = self.state.lock().unwrap();
        match state.pulls.get_mut(full) {
            Some(Pull::Running(envs)) => {
                envs.push(environment);
                true
            }
            Some(Pull::Failed(_)) => {
                state.pulls.remove(full);
                false
            }
            None => false,
        }
    }

    /// The stored image for the environment: its pin if the name is unchanged, else what the
    /// name refers to in the store (then pinned).
    fn stored(&self, environment: u64, full: &str) -> Result<Option<StoredImage>> {
        let pinned = self
            .store
            .pins()?
            .remove(&environment)
            .filter(|pin| pin.name == full);
        if let Some(pin) = pinned
            && let Some(image) = self.image(&pin.image)?
        {
            return Ok(Some(image));
        }
        let Some((entry, image)) = self.store.lookup(full)? else {
            return Ok(None);
        };
        self.pin(environment, full, entry)?;
        Ok(Some(image))
    }

    fn image(&self, id: &Digest) -> Result<Option<StoredImage>> {
        if let Some(image) = self.state.lock().unwrap().cache.get(id) {
            return Ok(Some(image.clone()));
        }
        let image = self.store.image(id)?;
        if let Some(image) = &image {
            self.state
                .lock()
                .unwrap()
                .cache
                .insert(id.clone(), image.clone());
        }
        Ok(image)
    }

    fn pin(&self, environment: u64, full: &str, entry: RefEntry) -> Result<()> {
        let pin = Pin {
            name: full.to_owned(),
            image: entry.image,
            manifest: entry.manifest,
        };
        if self.store.pins()?.get(&environment) != Some(&pin) {
            log::info!(
                "environment {environment} runs image {full} (id {}, manifest {})",
                pin.image,
                pin.manifest
            );
        }
        self.store.pin(environment, pin)
    }

    /// Whether the environment's image is ready (without waiting); an error if its pull failed.
    /// An image neither stored nor being pulled (e.g. after a restart that interrupted its
    /// pull) starts being pulled.
    pub fn is_ready(self: &Arc<Self>, environment: u64, name: &str) -> Result<bool> {
        let full = parse(name)?.to_string();
        if self.stored(environment, &full)?.is_some() {
            return Ok(true);
        }
        match self.state.lock().unwrap().pulls.get(&full) {
            Some(Pull::Running(_)) => return Ok(false),
            Some(Pull::Failed(message)) => return Err(Error::Image(message.clone())),
            None => {}
        }
        self.prepare(environment, name)?;
        Ok(false)
    }

    /// The environment's image, waiting up to `wait` while it is being pulled.
    pub fn get(self: &Arc<Self>, environment: u64, name: &str, wait: Duration) -> Result<Ready> {
        let full = parse(name)?.to_string();
        let deadline = Instant::now() + wait;
        if !self.is_ready(environment, name)? {
            let mut state = self.state.lock().unwrap();
            loop {
                match state.pulls.get(&full) {
                    Some(Pull::Running(_)) => {}
                    Some(Pull::Failed(message)) => return Err(Error::Image(message.clone())),
                    None => break,
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::ImagePending(name.to_owned()));
                }
                state = self.changed.wait_timeout(state, left).unwrap().0;
            }
        }
        let image = self
            .stored(environment, &full)?
            .ok_or_else(|| Error::UnknownImage(name.to_owned()))?;
        Ok(Ready {
            root: self.store.rootfs(&image.id),
            image,
        })
    }
}

/// A name that is not an image reference is simply an unknown image.
fn parse(name: &str) -> Result<Reference> {
    Reference::parse(name).map_err(|_| Error::UnknownImage(name.to_owned()))
}
