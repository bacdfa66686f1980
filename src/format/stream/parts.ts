// What an image keeps of a stream besides its pages: the parts load sends back verbatim, and the names the source
// gave. A module of its own, without the parser, so that save's main thread (which only copies them into the
// metadata) does not load the parser.

/** The parts of a stream an image keeps, verbatim or as the source named them (SnapshotMeta extends this). */
export interface StreamParts {
  /** Machine type from the configuration section, e.g. "pc-i440fx-7.2". */
  machineType: string;
  /** Capabilities named in the configuration section (QEMU 7.2 names only validatable ones). */
  capabilities: string[];
  /** RAM section id and version as the source sent them. */
  ramSectionId: number;
  ramVersionId: number;
  /** Stream bytes before the RAM setup section: file header and configuration section, verbatim. */
  head: Uint8Array;
  /** The whole ram START section (header, setup payload, EOS, footer), verbatim. */
  ramSetup: Uint8Array;
  /**
   * COMMAND sections QEMU sent among the RAM sections, verbatim, in order: QEMU 10.0+'s SWITCHOVER_START (empty for
   * older sources and old machine types). Load sends them after the RAM pages and before the device state, as QEMU
   * does (migration.c migration_completion_precopy, postcopy_start).
   */
  switchoverCommands: Uint8Array;
  /** Everything after the last RAM section: device state sections, EOF, VM description; verbatim. */
  deviceState: Uint8Array;
  /** True if the stream had a ram END section (plain migration); background snapshots have none. */
  sawRamEnd: boolean;
}

/** The StreamParts of a parsed stream (what an image's metadata copies from it). */
export function streamParts(p: StreamParts): StreamParts {
  const { machineType, capabilities, ramSectionId, ramVersionId, head, ramSetup, switchoverCommands, deviceState, sawRamEnd } = p;
  return { machineType, capabilities, ramSectionId, ramVersionId, head, ramSetup, switchoverCommands, deviceState, sawRamEnd };
}
