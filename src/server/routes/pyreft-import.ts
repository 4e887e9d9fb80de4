import type { FastifyInstance } from 'fastify';
import { importReplacedExisting, pyreftConfigMissing, pyreftFileDuplicate, pyreftPositionsMissing } from '../../errors.ts';
import { parsePositions } from '../../interventions/positions.ts';
import type { ModelConfig } from '../../model/config.ts';
import { problemSchema } from './schemas.ts';
import { storeArtifact } from '../intervention-service.ts';
import { interventionBody, interventionSchema, parseBool, type InterventionRouteDeps } from './interventions.ts';
import { MAX_CONFIG_BYTES, TEXT_FIELDS, readMultipart } from './multipart.ts';
import { IMPORT_PYREFT } from '../../interventions/pyreft/index.ts';
import { stateDictElementLimit } from '../../interventions/pyreft/convert.ts';
import { PICKLE_LIMITS } from '../../interventions/pyreft/pickle.ts';

/**
 * Imports an intervention saved by pyreft (config.json + intkey_*.bin zip-pickles, read as
 * data: nothing in them is executed) and stores the reft/v1 artifact it converts to.
 */
/** intkey_*.bin parts in one import (one per intervention; pyreft models rarely have more than a few). */
const MAX_PYREFT_FILES = 64;

export function pyreftImportRoutes(app: FastifyInstance, deps: InterventionRouteDeps & { model: () => ModelConfig }): void {
  app.post(
    '/v1/interventions/import/pyreft',
    {
      schema: {
        summary:
          'Import a pyreft intervention (multipart: config = config.json, one files part per intkey_*.bin, positions, share_weights, name)',
        tags: ['interventions'],
        consumes: ['multipart/form-data'],
        response: { 201: interventionSchema, '4xx': problemSchema, '5xx': problemSchema },
      },
    },
    async (request, reply) => {
      const model = deps.model();
      // each intkey_*.bin holds one intervention's state dict: its tensors, a pickle, a zip around them
      const perFile = Math.min(deps.uploadLimit, 8 * stateDictElementLimit(model.hiddenSize) + PICKLE_LIMITS.maxBytes + 64 * 1024);
      const parts = await readMultipart(request, {
        parts: {
          config: { count: 1, maxBytes: MAX_CONFIG_BYTES },
          files: { count: MAX_PYREFT_FILES, maxBytes: perFile },
          ...TEXT_FIELDS(['positions', 'share_weights', 'name', 'description']),
        },
        maxTotalBytes: deps.uploadLimit,
      });
      const config =
        parts.files.get('config')?.[0]?.bytes ??
        (parts.fields.has('config') ? new TextEncoder().encode(parts.fields.get('config')) : undefined);
      if (!config) throw pyreftConfigMissing('config');
      const positions = parts.fields.get('positions');
      if (!positions) throw pyreftPositionsMissing('positions');
      parsePositions(positions, 'positions');
      const files = new Map<string, Uint8Array>();
      for (const f of parts.files.get('files') ?? []) {
        if (files.has(f.filename)) throw pyreftFileDuplicate({ file: f.filename }, 'files');
        files.set(f.filename, f.bytes);
      }
      const converted = await deps.offload().run(IMPORT_PYREFT, {
        input: { config, files, positions, shareWeights: parseBool(parts.fields.get('share_weights'), 'share_weights', false) },
        base: { hiddenSize: model.hiddenSize, numLayers: model.numLayers, architecture: model.architecture },
      });
      const { meta, created } = await storeArtifact(
        deps,
        request.tenant.id,
        { config: converted.configBytes, weights: converted.weightBytes },
        {
          name: parts.fields.get('name'),
          description: parts.fields.get('description'),
          replace: false,
          source: 'import',
        },
      );
      if (!created) throw importReplacedExisting();
      request.log.info({ intervention: meta.id, tenant: request.tenant.id, files: files.size }, 'pyreft intervention imported');
      return reply.status(201).send(interventionBody(meta));
    },
  );
}
