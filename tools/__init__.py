"""The admin commands (mkfs.cloudfs, fsck.cloudfs, cloudfs)."""
