'use strict';

/**
 * Every error this package produces is a plain `Error` with a stable `code`.
 * Codes coming from the daemon (EAUTH, EHOSTKEY, ECONNREFUSED, ETIMEDOUT, ...)
 * are passed through unchanged; codes made here:
 *   EDAEMON      the daemon could not be found, started or reached, or it broke the protocol
 *   ENOPYTHON    autostart: the Python interpreter does not exist
 *   ENOWRAITH    autostart: Python exists but `wraith_core` is not installed for it
 *   EFRAME       a control-stream frame was too large or not valid JSON (SPEC §7)
 *   EUSAGE       bad options passed to connect()/serve()/createWraithEventTarget()
 *   ECLOSED      the stream / server / event target is already closed
 *   ERESET       the daemon closed the stream without a clean end (abort)
 */
function wraithError(code, message, extra) {
  const err = new Error(message);
  err.code = code;
  if (extra) {
    for (const [k, v] of Object.entries(extra)) {
      if (v !== undefined) err[k] = v;
    }
  }
  return err;
}

/** The AbortError an aborted operation rejects with (code ABORT_ERR, as Node's own). */
function abortError(signal) {
  const err = wraithError('ABORT_ERR', 'The operation was aborted', { cause: signal && signal.reason });
  err.name = 'AbortError';
  return err;
}

module.exports = { wraithError, abortError };
