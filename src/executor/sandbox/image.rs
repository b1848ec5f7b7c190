//! Resolving an environment's image name to the lower layer of its runners' root file system:
//! a configured alias, then a directory under the images directory, then the built-in `host`
//! image; anything else is an unknown image.

use std::{
    collections::BTreeMap,
    path::{Component, Path},
};

use super::protocol::ImageSource;
use crate::error::{Error, Result};

/// The name of the built-in image.
pub const HOST_IMAGE: &str = "host";

/// Resolves `image` with the configured aliases and images directory.
pub fn resolve(
    image: &str,
    aliases: &BTreeMap<String, String>,
    images_dir: Option<&Path>,
) -> Result<ImageSource> {
    let unknown = || Error::UnknownImage(image.to_owned());
    let target = aliases.get(image).map_or(image, String::as_str);
    if let Some(dir) = images_dir.and_then(|dir| directory(dir, target)) {
        return Ok(ImageSource::Directory(dir));
    }
    if target == HOST_IMAGE {
        return Ok(ImageSource::Host);
    }
    Err(unknown())
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
        let resolve = |name: &str| resolve(name, &aliases, Some(&images));
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
