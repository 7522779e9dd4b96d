#!/bin/sh
exec hello "$@"
