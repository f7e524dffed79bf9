"""The FUSE adapter and the mount.cloudfs command."""
