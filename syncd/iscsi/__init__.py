"""iSCSI front end (RFC 7143): sans-IO codecs for PDUs, text keys and login (proto/iscsi.md)."""
