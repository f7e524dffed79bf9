"""How cloudfs turns secrets and block plaintext into stored bytes: key derivation and
wrapping (`crypto`) and the versioned block object format (`framing`)."""
