//! User-supplied methods that create a data directory: a custom bootstrap (`bootstrap.<method>`)
//! or replica creation method (`postgresql.<method>`), `docs/patroni-compat.md` §5.3, §5.4.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use crate::command::run_tool;
use crate::{PgError, Postgres};

impl Postgres {
    /// Runs a method's `command` (already split into words) with `args` appended, without a
    /// shell, with `PGPASSFILE` pointing at the pgpass file written for the source (Patroni
    /// does the same), killing its whole process group after `timeout`. A non-zero exit is an
    /// error carrying the end of its stderr.
    pub async fn run_method(
        &self,
        command: &[String],
        args: &[String],
        timeout: Duration,
    ) -> Result<(), PgError> {
        let Some((program, fixed)) = command.split_first() else {
            return Err(PgError::Invalid("empty method command".into()));
        };
        let args: Vec<OsString> = fixed.iter().chain(args).map(OsString::from).collect();
        let env = [("PGPASSFILE", self.settings.pgpass.as_os_str())];
        run_tool(Path::new(program), &args, &env, timeout)
            .await
            .map(|_| ())
    }

    /// The connection string a replica method gets as `--connstring`: the replication user at
    /// `host:port`, with its TLS keywords and without the password (it is in the pgpass file).
    pub fn replication_dsn(&self, host: &str, port: u16) -> String {
        self.tool_dsn(host, port, &self.settings.replication)
    }

    /// The connection string `post_bootstrap` gets: the superuser on the local address, without
    /// the password (it is in the pgpass file).
    pub fn superuser_dsn(&self) -> String {
        let s = &self.settings;
        self.tool_dsn(&s.listen_host, s.port, &s.superuser)
    }
}
