//! Resolving an environment's image name to the lower layer of its runners' root file system:
//! a configured alias, then a directory under the images directory, then the built-in `host`
//! image, then a container image from the image store (pulled from its registry if needed).

use std::{
    collections::BTreeMap,
    path::{Component, Path},
    sync::Arc,
    time::Duration,
};

use super::protocol::ImageSource;
use crate::{
    error::{Error, Result},
    id::EnvironmentId,
    image::service::Images,
};

/// The name of the built-in image.
pub const HOST_IMAGE: &str = "host";
/// How long creating a runner (a claim) waits for an image that is being pulled.
pub const PULL_WAIT: Duration = Duration::from_secs(30);

/// Where an image's runners come from, and the image's `Env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lower {
    /// The lower layer.
    pub source: ImageSource,
    /// The image's `Env` (empty for directory and host images).
    pub env: Vec<String>,
}

/// How names resolve: aliases, the images directory, the store of registry images.
#[derive(Debug, Clone, Copy)]
pub struct Resolver<'a> {
    /// Configured aliases.
    pub aliases: &'a BTreeMap<String, String>,
    /// The images directory.
    pub images_dir: Option<&'a Path>,
    /// Registry images, if the store could be opened.
    pub images: Option<&'a Arc<Images>>,
}

impl Resolver<'_> {
    /// The alias target of `image`, and its directory or host source if it is one.
    fn local(&self, image: &str) -> (String, Option<ImageSource>) {
        let target = self.aliases.get(image).map_or(image, String::as_str);
        if let Some(dir) = self.images_dir.and_then(|dir| directory(dir, target)) {
            return (target.to_owned(), Some(ImageSource::Directory(dir)));
        }
        if target == HOST_IMAGE {
            return (target.to_owned(), Some(ImageSource::Host));
        }
        (target.to_owned(), None)
    }

    fn registry(&self, image: &str) -> Result<&Arc<Images>> {
        self.images
            .ok_or_else(|| Error::UnknownImage(image.to_owned()))
    }

    /// For an environment PUT: local images are checked, registry images resolved (their
    /// layers then pull in the background).
    pub fn check(&self, environment: EnvironmentId, image: &str) -> Result<()> {
        match self.local(image) {
            (_, Some(_)) => Ok(()),
            (target, None) => self.registry(image)?.prepare(environment.0, &target),
        }
    }

    /// Whether a runner can be built now without waiting for a pull.
    pub fn ready(&self, environment: EnvironmentId, image: &str) -> Result<bool> {
        match self.local(image) {
            (_, Some(_)) => Ok(true),
            (target, None) => self.registry(image)?.is_ready(environment.0, &target),
        }
    }

    /// The lower layer for a runner, waiting up to `wait` for an image being pulled.
    pub fn lower(&self, environment: EnvironmentId, image: &str, wait: Duration) -> Result<Lower> {
        match self.local(image) {
            (_, Some(source)) => Ok(Lower {
                source,
                env: Vec::new(),
            }),
            (target, None) => {
                let ready = self.registry(image)?.get(environment.0, &target, wait)?;
                Ok(Lower {
                    source: ImageSource::Directory(ready.root),
                    env: ready.image.env,
                })
            }
        }
    }
}

/// `<images_dir>/<name>` if `name` is a relative path without `..` naming a directory.
fn directory(images_dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    let relative = Path::new(name);
    let plain = !name.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    let dir = images_dir.join(relative);
    (plain && dir.is_dir()).then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_directories_and_host_resolve_in_order() {
        let images = std::env::temp_dir().join(format!("poseidon-images-{}", std::process::id()));
        std::fs::create_dir_all(images.join("openhpi/python:3.8")).unwrap();
        let aliases = BTreeMap::from([
            ("py".to_owned(), "openhpi/python:3.8".to_owned()),
            ("plain".to_owned(), "host".to_owned()),
        ]);
        let resolver = Resolver {
            aliases: &aliases,
            images_dir: Some(&images),
            images: None,
        };
        let resolve = |name: &str| {
            resolver
                .lower(EnvironmentId(1), name, Duration::ZERO)
                .map(|lower| lower.source)
        };
        assert_eq!(
            resolve("py").unwrap(),
            ImageSource::Directory(images.join("openhpi/python:3.8"))
        );
        assert_eq!(
            resolve("openhpi/python:3.8").unwrap(),
            ImageSource::Directory(images.join("openhpi/python:3.8"))
        );
        assert_eq!(resolve("plain").unwrap(), ImageSource::Host);
        assert_eq!(resolve("host").unwrap(), ImageSource::Host);
        let err = resolve("../etc").unwrap_err();
        assert_eq!(err.to_string(), "unknown image \"../etc\"");
        assert!(matches!(resolve("nope"), Err(Error::UnknownImage(_))));
        std::fs::remove_dir_all(images).unwrap();
    }
}
